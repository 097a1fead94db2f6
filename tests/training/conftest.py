"""Fixtures for training tests: taxonomies and one real (tiny) trained model directory per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from schemas.taxonomy import Taxonomy, load_taxonomy

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The CI machine has 2 cores shared by everything; one intra-op thread is faster under contention.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fmnist_taxonomy() -> Taxonomy:
    return load_taxonomy("fashion-mnist")


@pytest.fixture(scope="session")
def mixed_taxonomy() -> Taxonomy:
    """Two exclusive groups and one non-exclusive (multi-label) group."""
    return Taxonomy.model_validate({
        "name": "mixed", "version": 1, "types": ["top", "bottom"],
        "categories": [{"name": "tee", "type": "top"}, {"name": "jeans", "type": "bottom"},
                       {"name": "shirt", "type": "top"}],
        "attribute_groups": [
            {"name": "colour", "exclusive": True, "values": ["red", "blue"]},
            {"name": "sleeve", "exclusive": True, "values": ["long", "short", "none"]},
            {"name": "style", "exclusive": False, "values": ["casual", "formal", "sport", "vintage"]},
        ],
    })


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, fmnist_dir: Path) -> Path:
    from training.train import train_tiny

    return train_tiny(tmp_path_factory.mktemp("models"), fmnist_dir)
