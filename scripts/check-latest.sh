#!/usr/bin/env bash
# Does the project still work with the newest releases pyproject's ranges allow? Installs them into a scratch
# virtualenv (not .venv), prints where they differ from the lock, and runs the fast lane of the tests
# (not slow, not the fault suite). Passing means `bash scripts/lock.sh` can move the lock forward.
# Needs the services of the fast lane (Postgres, Redis, RabbitMQ; Kafka/S3 tests skip unless
# ENRICH_TEST_KAFKA / ENRICH_TEST_S3 are set).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ENRICH_LATEST_VENV:-${TMPDIR:-/tmp}/enrich-latest-venv}
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"

echo "== newer than the lock"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import re

locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open("requirements-dev.lock").read(), re.M))
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731 - one-line name normaliser
locked = {norm(k): v for k, v in locked.items()}
moved = [(d.metadata["Name"], locked[norm(d.metadata["Name"])], d.version) for d in md.distributions()
         if norm(d.metadata["Name"]) in locked and locked[norm(d.metadata["Name"])] != d.version]
for name, old, new in sorted(moved, key=lambda m: m[0].lower()):
    print(f"  {name}: {old} -> {new}")
print(f"{len(moved)} package(s) differ from requirements-dev.lock")
PY

echo "== fast lane"
"$VENV/bin/python" -m pytest -m "not slow and not faults" -p no:cacheprovider "$@"
