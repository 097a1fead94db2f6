"""Batch samplers (seed 000): M photos per item for triplet mining, class-balanced draws otherwise."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler, WeightedRandomSampler

from training.losses import class_weights


class MPerItemSampler(Sampler[int]):
    """pytorch-metric-learning's MPerClassSampler contract — consecutive runs of batch_size/m distinct
    items with m photos each (distinct photos where the item has m), ``length`` indices per pass — but
    drawn with a few numpy calls per pass. Why not the library's: its pass loops over classes in
    Python, which on a GPU costs a large share of the retrieval stages' time."""

    def __init__(self, item_ids: np.ndarray, batch_size: int, m: int, length: int, seed: int = 0) -> None:
        items, self.inverse = np.unique(np.asarray(item_ids), return_inverse=True)
        self.counts = np.bincount(self.inverse)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.n_items, self.m, self.per_batch = len(items), m, batch_size // m
        self.length = length
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        k = self.length // self.m  # items this pass
        usable = self.n_items - self.n_items % self.per_batch  # whole batches per permutation: no repeats
        items = np.concatenate([self.rng.permutation(self.n_items)[:usable]
                                for _ in range(-(-k // usable))])[:k]
        # each item's photos in a fresh random order; the first m (cycling when it has fewer)
        order = np.lexsort((self.rng.random(len(self.inverse)), self.inverse))
        pick = self.starts[items][:, None] + np.arange(self.m)[None, :] % self.counts[items][:, None]
        return iter(order[pick].reshape(-1).tolist())


def m_per_item_sampler(item_ids: np.ndarray, batch_size: int, m: int = 4,
                       length: int | None = None, seed: int = 0) -> MPerItemSampler:
    """Every batch holds batch_size/m items with m photos each, so each anchor has positives."""
    if batch_size % m:
        raise ValueError(f"batch_size {batch_size} must be a multiple of m={m}")
    n_items = len(np.unique(item_ids))
    if n_items < batch_size // m:
        raise ValueError(f"{n_items} items cannot fill batches of {batch_size // m} items")
    length = length or len(item_ids)
    length -= length % batch_size
    return MPerItemSampler(np.asarray(item_ids), batch_size, m, length, seed)


def class_balanced_sampler(labels: np.ndarray, num_classes: int, num_samples: int | None = None,
                           generator: torch.Generator | None = None,
                           labelled: np.ndarray | None = None) -> WeightedRandomSampler:
    """WeightedRandomSampler whose per-sample weight is its class's seed-000 weight. ``labelled`` marks
    rows with some label: those without a category (an attribute-only correction) weigh 1, the mean."""
    w = class_weights(labels, num_classes)
    other = 0.0 if labelled is None else np.where(labelled, 1.0, 0.0)
    # unlabelled rows are never drawn for classification batches (unless nothing is labelled)
    per_sample = np.where(labels >= 0, w[np.clip(labels, 0, None)], other)
    if not per_sample.any():
        per_sample = np.ones(len(labels))
    return WeightedRandomSampler(torch.as_tensor(per_sample, dtype=torch.double),
                                 num_samples=num_samples or len(labels), replacement=True, generator=generator)


def make_sampler(kind: str, *, labels: np.ndarray, item_ids: np.ndarray, num_classes: int, batch_size: int,
                 m: int = 4, length: int | None = None, generator: torch.Generator | None = None,
                 labelled: np.ndarray | None = None) -> Sampler:
    if kind == "m_per_item":
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator)) if generator is not None else 0
        return m_per_item_sampler(item_ids, batch_size, m, length, seed)
    if kind == "balanced":
        return class_balanced_sampler(labels, num_classes, length, generator, labelled)
    raise RuntimeError(f"Invalid sampler {kind!r}. Only 'm_per_item' and 'balanced' are supported.")


class _Subset(Sampler[list[int]]):
    """Batches of positions within `rows`, mapped back to dataset indices."""

    def __init__(self, batches: BatchSampler, rows: np.ndarray) -> None:
        self.batches, self.rows = batches, rows

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            yield self.rows[np.asarray(b)].tolist()


class InterleavedBatchSampler(Sampler[list[int]]):
    """Alternate batches from several sources, restarting any that runs out (seed 000 interleaves
    classification batches and retrieval batches when they come from different datasets)."""

    def __init__(self, sources: list[Sampler[list[int]]]) -> None:
        if not sources:
            raise ValueError("need at least one batch source")
        self.sources = sources

    def __len__(self) -> int:
        return len(self.sources) * max(len(s) for s in self.sources)

    def __iter__(self):
        its = [iter(s) for s in self.sources]
        for i in range(len(self)):
            k = i % len(self.sources)
            try:
                yield next(its[k])
            except StopIteration:
                its[k] = iter(self.sources[k])
                yield next(its[k])


def make_batch_sampler(kind: str, *, labels: np.ndarray, item_ids: np.ndarray, num_classes: int, batch_size: int,
                       m: int = 4, generator: torch.Generator | None = None,
                       labelled: np.ndarray | None = None, classification: bool = True) -> Sampler[list[int]]:
    """Batches for a stage. Triplet batches need item ids; where only some rows have them (DeepFashion
    Category & Attribute + In-shop, human corrections), retrieval batches from those rows alternate with
    class-balanced batches from the rows that have a label (``labelled``, default: a category) — unless
    the stage trains no classification (``classification=False``), where such batches would add nothing."""
    if kind != "m_per_item" or (item_ids >= 0).all():
        return BatchSampler(make_sampler(kind, labels=labels, item_ids=item_ids, num_classes=num_classes,
                                         batch_size=batch_size, m=m, generator=generator, labelled=labelled),
                            batch_size, drop_last=True)
    ret_rows = np.flatnonzero(item_ids >= 0)
    cls_rows = np.flatnonzero(labels >= 0 if labelled is None else labelled) if classification else ret_rows[:0]
    sources: list[Sampler[list[int]]] = []
    if len(ret_rows):
        ret = make_sampler(kind, labels=labels[ret_rows], item_ids=item_ids[ret_rows], num_classes=num_classes,
                           batch_size=batch_size, m=m, generator=generator)
        sources.append(_Subset(BatchSampler(ret, batch_size, drop_last=True), ret_rows))
    if len(cls_rows):
        sources.append(_Subset(BatchSampler(class_balanced_sampler(labels[cls_rows], num_classes,
                                                                   generator=generator,
                                                                   labelled=np.ones(len(cls_rows), bool)),
                                            batch_size,
                                            drop_last=True), cls_rows))
    return InterleavedBatchSampler(sources)
