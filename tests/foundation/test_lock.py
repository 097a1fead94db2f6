"""The lock files pin every dependency pyproject.toml names, inside its range, and the two locks agree:
a dependency added to pyproject without relocking, or a lock edited by hand out of range, fails here."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins(name: str) -> dict[str, str]:
    text = (ROOT / name).read_text()
    return {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M)}


def _unpinned(requirements: list[str], pins: dict[str, str]) -> list[str]:
    wrong = []
    for line in requirements:
        req = Requirement(line)
        version = pins.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            wrong.append(f"{req} (locked: {version})")
    return wrong


@pytest.mark.parametrize(("lock", "extras"), [("requirements.lock", []), ("requirements-dev.lock", ["dev"])])
def test_the_lock_pins_every_dependency_within_its_range(lock, extras):
    requirements = PROJECT["dependencies"] + [r for e in extras for r in PROJECT["optional-dependencies"][e]]
    assert _unpinned(requirements, _pins(lock)) == []


def test_the_dev_lock_keeps_the_runtime_versions():
    runtime, dev = _pins("requirements.lock"), _pins("requirements-dev.lock")
    assert {n: (v, dev.get(n)) for n, v in runtime.items() if dev.get(n) != v} == {}


def test_a_missing_or_out_of_range_pin_is_caught():
    pins = {"torch": "2.14.1", "kafka-python": "2.0.2"}
    assert _unpinned(["torch>=2.4", "kafka-python>=3.0", "rich>=13"], pins) == [
        "kafka-python>=3.0 (locked: 2.0.2)", "rich>=13 (locked: None)"]


def test_setup_docker_and_ci_install_from_the_locks():
    assert "pip install -q -r requirements-dev.lock" in (ROOT / "scripts/setup.sh").read_text()
    assert "pip install -r requirements.lock" in (ROOT / "Dockerfile").read_text()
    assert "bash scripts/setup.sh" in (ROOT / ".ci/run").read_text()
