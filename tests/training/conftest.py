"""Fixtures for training tests (the taxonomies and the tiny trained model are in tests/conftest.py, shared with
the model tests)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The CI machine has 2 cores shared by everything; one intra-op thread is faster under contention.
    torch.set_num_threads(1)


