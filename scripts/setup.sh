#!/usr/bin/env bash
# Create .venv and install the project with its dev extra from the lock file. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Exact versions from the lock (scripts/lock.sh compiles it from pyproject's ranges), then the project itself
# without dependencies, so a fresh machine gets what CI tested.
.venv/bin/python -m pip install -q -r requirements-dev.lock
.venv/bin/python -m pip install -q --no-deps -e .
# Fashion-MNIST (real clothing images) for the quickstart and the tests, from Debian.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${ENRICH_FMNIST_DIR:-}" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist (or set ENRICH_FMNIST_DIR)" >&2
  fi
fi
