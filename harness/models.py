"""Small real models on disk, written by the model package, for tests and benchmarks."""
from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import save_model
from model.network import build_model
from schemas.taxonomy import load_taxonomy


def save_small_model(out: Path, version: str, seed: int, colour_threshold: float = 0.0) -> Path:
    """A real model directory (small CNN, random init, fashion-mnist taxonomy) written by the model package."""
    torch.manual_seed(seed)
    model = build_model("small_cnn", load_taxonomy("fashion-mnist"), pretrained=False)
    # thresholds 0: every missing group is filled, so provenance rules are checked on real outputs; each
    # later seed scores higher, so the registry's gate lets it replace an earlier one
    save_model(model, out, model_version=version, image_size=32,
               thresholds={"category": 0.0, "type": 0.0, "colour": colour_threshold},
               metrics={"test/top1": 0.1 * (seed + 1)})
    return out
