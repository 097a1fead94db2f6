"""Fixtures for the similar-items tests."""
from __future__ import annotations

import pytest

from core.config import Settings


@pytest.fixture()
def root(tmp_path):
    """Snapshot directory for one test."""
    return tmp_path / "index"


@pytest.fixture()
def settings(root) -> Settings:
    """What the library code is handed: snapshots under `root`, no S3 publishing."""
    return Settings(index_dir=root, index_uri=None)
