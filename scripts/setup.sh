#!/usr/bin/env bash
# Create .venv and install the project with its dev extra. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision first and pinned to the wheels this platform provides (CUDA builds run on CPU too);
# pyproject only states ranges.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" \
  || .venv/bin/python -m pip install -q "torch>=2.4" "torchvision>=0.19"
.venv/bin/python -m pip install -q -e ".[dev]"
# Fashion-MNIST (real clothing images) for the quickstart and the tests, from Debian.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${ENRICH_FMNIST_DIR:-}" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist (or set ENRICH_FMNIST_DIR)" >&2
  fi
fi
