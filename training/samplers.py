"""Batch samplers: M photos per item for triplet mining, class-balanced draws otherwise — and each
process's share of them when several train together (``ShardedBatchSampler``)."""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler, WeightedRandomSampler

from training.losses import class_weights


class Batches(Protocol):
    """A sized iterable of batches (lists of dataset indices): what the batch samplers here take and give."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[list[int]]: ...


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
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def set_epoch(self, epoch: int) -> None:
        """The next pass draws from (seed, epoch) alone, as DistributedSampler.set_epoch."""
        self.rng = np.random.default_rng([self.seed, epoch])

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


class BalancedSampler(WeightedRandomSampler):
    """WeightedRandomSampler (with replacement) that draws from a seed of its own, so that ``set_epoch``
    can make a pass depend on (seed, epoch) alone."""

    def __init__(self, weights: Sequence[float], num_samples: int, seed: int) -> None:
        super().__init__(weights, num_samples, replacement=True, generator=torch.Generator().manual_seed(seed))
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))


def _seed_from(generator: torch.Generator | None) -> int:
    return int(torch.randint(2**31 - 1, (1,), generator=generator)) if generator is not None else 0


def class_balanced_sampler(labels: np.ndarray, num_classes: int, num_samples: int | None = None,
                           generator: torch.Generator | None = None,
                           labelled: np.ndarray | None = None) -> BalancedSampler:
    """WeightedRandomSampler whose per-sample weight is its class's weight (``class_weights``). ``labelled`` marks
    rows with some label: those without a category (an attribute-only correction) weigh 1, the mean."""
    w = class_weights(labels, num_classes)
    other = 0.0 if labelled is None else np.where(labelled, 1.0, 0.0)
    # unlabelled rows are never drawn for classification batches (unless nothing is labelled)
    per_sample = np.where(labels >= 0, w[np.clip(labels, 0, None)], other)
    if not per_sample.any():
        per_sample = np.ones(len(labels))
    return BalancedSampler(per_sample.astype(np.float64).tolist(), num_samples or len(labels), _seed_from(generator))


def make_sampler(kind: str, *, labels: np.ndarray, item_ids: np.ndarray, num_classes: int, batch_size: int,
                 m: int = 4, length: int | None = None, generator: torch.Generator | None = None,
                 labelled: np.ndarray | None = None) -> Sampler:
    if kind == "m_per_item":
        return m_per_item_sampler(item_ids, batch_size, m, length, _seed_from(generator))
    if kind == "balanced":
        return class_balanced_sampler(labels, num_classes, length, generator, labelled)
    raise RuntimeError(f"Invalid sampler {kind!r}. Only 'm_per_item' and 'balanced' are supported.")


class _Subset(Sampler[list[int]]):
    """Batches of positions within `rows`, mapped back to dataset indices."""

    def __init__(self, batches: BatchSampler, rows: np.ndarray) -> None:
        self.batches, self.rows = batches, rows

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.batches:
            yield self.rows[np.asarray(b)].tolist()


class InterleavedBatchSampler(Sampler[list[int]]):
    """Alternate batches from several sources, restarting any that runs out (classification batches and
    retrieval batches, when they come from different rows or datasets)."""

    def __init__(self, sources: list[Batches]) -> None:
        if not sources:
            raise ValueError("need at least one batch source")
        self.sources = sources

    def __len__(self) -> int:
        return len(self.sources) * max(len(s) for s in self.sources)

    def __iter__(self) -> Iterator[list[int]]:
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
                       labelled: np.ndarray | None = None, classification: bool = True,
                       rank: int = 0, world: int = 1) -> ShardedBatchSampler:
    """Batches for a stage: this rank's share (``ShardedBatchSampler``) of global batches of ``batch_size``
    (the same on every rank: ``generator`` starts in the same state there). Triplet batches need item ids;
    where only some rows have them (DeepFashion Category & Attribute + In-shop, human corrections), retrieval
    batches from those rows alternate with class-balanced batches from the rows that have a label
    (``labelled``, default: a category) — unless the stage trains no classification
    (``classification=False``), where such batches would add nothing."""
    per_rank, rest = divmod(batch_size, world)
    if rest or (kind == "m_per_item" and per_rank % m):
        raise ValueError(f"batch size {batch_size} cannot be shared by {world} processes"
                         + (f" in runs of m={m} photos per item" if kind == "m_per_item" else "")
                         + f": make it a multiple of {world * (m if kind == 'm_per_item' else 1)}")
    return ShardedBatchSampler(_global_batches(kind, labels=labels, item_ids=item_ids, num_classes=num_classes,
                                               batch_size=batch_size, m=m, generator=generator, labelled=labelled,
                                               classification=classification), rank, world)


def _global_batches(kind: str, *, labels: np.ndarray, item_ids: np.ndarray, num_classes: int, batch_size: int,
                    m: int, generator: torch.Generator | None, labelled: np.ndarray | None,
                    classification: bool) -> Batches:
    if kind != "m_per_item" or (item_ids >= 0).all():
        return BatchSampler(make_sampler(kind, labels=labels, item_ids=item_ids, num_classes=num_classes,
                                         batch_size=batch_size, m=m, generator=generator, labelled=labelled),
                            batch_size, drop_last=True)
    ret_rows = np.flatnonzero(item_ids >= 0)
    cls_rows = np.flatnonzero(labels >= 0 if labelled is None else labelled) if classification else ret_rows[:0]
    sources: list[Batches] = []
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


def set_epoch(sampler, epoch: int) -> None:
    """DistributedSampler's ``set_epoch`` through a tree of these samplers: the next pass of every seeded one
    depends on its seed and ``epoch`` alone."""
    if isinstance(sampler, (MPerItemSampler, BalancedSampler)):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, BatchSampler):
        set_epoch(sampler.sampler, epoch)
    elif isinstance(sampler, _Subset):
        set_epoch(sampler.batches, epoch)
    elif isinstance(sampler, InterleavedBatchSampler):
        for s in sampler.sources:
            set_epoch(s, epoch)


class ShardedBatchSampler(Sampler[list[int]]):
    """One process's share of global batches: every rank draws the same global batches (same seed) and rank r
    of ``world`` keeps the r-th of ``world`` equal contiguous slices of each — disjoint shares that together
    are the batch one process would train on; contiguous, so M-per-item runs stay whole when a share is a
    multiple of m. Each pass is an epoch: pass e's batches depend on the seed and e alone (``set_epoch``
    chooses the next one). ``taken`` queues the shares handed out, for the trainer to count what it used."""

    def __init__(self, batches: Batches, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.batches, self.rank, self.world = batches, rank, world
        self.epoch = 0
        self.taken: deque[list[int]] = deque(maxlen=2 * max(1, len(batches)))  # at most a pass ahead

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        set_epoch(self.batches, self.epoch)
        self.epoch += 1
        for b in self.batches:
            k = len(b) // self.world
            share = list(b[self.rank * k:(self.rank + 1) * k])
            self.taken.append(share)
            yield share
