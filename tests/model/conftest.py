"""Fixtures of the model tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    # The CI machine has 2 cores shared by everything; one intra-op thread is faster under contention.
    torch.set_num_threads(1)
