"""Fixtures of the core tests: the loopback HTTP image server the worker tests also use."""
from __future__ import annotations

from tests.worker.conftest import http_dir  # noqa: F401 - fixture
