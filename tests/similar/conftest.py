"""Fixtures for the similar-items tests."""
from __future__ import annotations

import pytest


@pytest.fixture()
def root(tmp_path):
    """Snapshot directory for one test."""
    return tmp_path / "index"
