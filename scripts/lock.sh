#!/usr/bin/env bash
# Recompile the lock files from pyproject.toml's ranges (pip-tools), newest versions that satisfy them:
#   requirements.lock      runtime dependencies (the Dockerfile installs these)
#   requirements-dev.lock  runtime + the dev extra, constrained to requirements.lock (setup.sh and CI)
# Run after changing dependencies in pyproject.toml, or to move the lock forward after
# scripts/check-latest.sh passed. Resolves for this platform (Linux x86_64, Python 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
COMPILE=(.venv/bin/pip-compile -q --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links
         --no-emit-trusted-host --upgrade -c scripts/lock-pins.txt)
"${COMPILE[@]}" -o requirements.lock pyproject.toml
"${COMPILE[@]}" --extra dev -c requirements.lock -o requirements-dev.lock pyproject.toml
echo "requirements.lock: $(grep -c '==' requirements.lock) pins; requirements-dev.lock: $(grep -c '==' requirements-dev.lock) pins"
