"""Fixtures of the model tests: the taxonomies and the tiny trained model, shared with the training tests."""
from __future__ import annotations

from tests.training.conftest import (  # noqa: F401 - fixtures
    _one_thread,
    fmnist_taxonomy,
    mixed_taxonomy,
    tiny_model_dir,
)
