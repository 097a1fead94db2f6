"""Batch samplers (seed 000): M photos per item for triplet mining, class-balanced draws otherwise."""
from __future__ import annotations

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import Sampler, WeightedRandomSampler

from training.losses import class_weights


def m_per_item_sampler(item_ids: np.ndarray, batch_size: int, m: int = 4,
                       length: int | None = None) -> MPerClassSampler:
    """Every batch holds batch_size/m items with m photos each, so each anchor has positives."""
    if batch_size % m:
        raise ValueError(f"batch_size {batch_size} must be a multiple of m={m}")
    n_items = len(np.unique(item_ids))
    if n_items < batch_size // m:
        raise ValueError(f"{n_items} items cannot fill batches of {batch_size // m} items")
    length = length or len(item_ids)
    length -= length % batch_size
    return MPerClassSampler(np.asarray(item_ids), m=m, batch_size=batch_size, length_before_new_iter=length)


def class_balanced_sampler(labels: np.ndarray, num_classes: int, num_samples: int | None = None,
                           generator: torch.Generator | None = None) -> WeightedRandomSampler:
    """WeightedRandomSampler whose per-sample weight is its class's seed-000 weight."""
    w = class_weights(labels, num_classes)
    per_sample = np.where(labels >= 0, w[np.clip(labels, 0, None)], w.min())
    return WeightedRandomSampler(torch.as_tensor(per_sample, dtype=torch.double),
                                 num_samples=num_samples or len(labels), replacement=True, generator=generator)


def make_sampler(kind: str, *, labels: np.ndarray, item_ids: np.ndarray, num_classes: int, batch_size: int,
                 m: int = 4, length: int | None = None, generator: torch.Generator | None = None) -> Sampler:
    if kind == "m_per_item":
        return m_per_item_sampler(item_ids, batch_size, m, length)
    if kind == "balanced":
        return class_balanced_sampler(labels, num_classes, length, generator)
    raise RuntimeError(f"Invalid sampler {kind!r}. Only 'm_per_item' and 'balanced' are supported.")
