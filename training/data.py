"""In-memory labelled image set used for training and evaluation (readers produce one of these), and the
prepared splits of a training run."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from schemas.taxonomy import Taxonomy
from training.losses import MISSING

# Reads one row's image from what LabelledImages.images holds for it (a file reference such as DeepFashion's
# (path, box), or a photo already in memory): RGB uint8 (H, W, 3).
ImageLoader = Callable[[Any], np.ndarray]


@dataclass
class LabelledImages:
    """Photos with their labels. Exclusive groups: int index or MISSING; others: multi-hot + presence."""

    images: np.ndarray  # (N, H, W, 3) uint8, or an object array of file paths loaded lazily
    category: np.ndarray  # (N,) int64, MISSING where unknown
    item_ids: np.ndarray  # (N,) int64 retrieval identity, MISSING where unknown
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # (N,) int64 or (N, V) float32
    present: dict[str, np.ndarray] = field(default_factory=dict)  # non-exclusive: (N,) bool
    # per-row loss factors of "category" and exclusive groups, (N,) float32; a group not here: all 1
    # (weak labels read from listing text count with TrainConfig.weak_label_weight)
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.category)

    def subset(self, idx: np.ndarray) -> LabelledImages:
        return LabelledImages(self.images[idx], self.category[idx], self.item_ids[idx],
                              {k: v[idx] for k, v in self.groups.items()},
                              {k: v[idx] for k, v in self.present.items()},
                              {k: v[idx] for k, v in self.weights.items()})

    def row_weight(self, key: str) -> np.ndarray:
        """(N,) float32 loss factors of ``key`` ("category" or a group): all 1 where none were set."""
        w = self.weights.get(key)
        return np.ones(len(self), np.float32) if w is None else w

    def labelled(self) -> np.ndarray:
        """(N,) bool: rows with a category or any attribute label."""
        has = self.category >= 0
        for g, arr in self.groups.items():
            has = has | (self.present[g] if g in self.present else arr >= 0)
        return has

    def concat(self, other: LabelledImages) -> LabelledImages:
        """Rows of both (the same groups; in-memory photos must have the same size)."""
        if set(self.groups) != set(other.groups) or set(self.present) != set(other.present):
            raise ValueError("cannot concatenate image sets with different attribute groups")
        if self.images.dtype != other.images.dtype or self.images.shape[1:] != other.images.shape[1:]:
            raise ValueError(f"cannot concatenate photos of {self.images.shape[1:]} ({self.images.dtype}) "
                             f"with {other.images.shape[1:]} ({other.images.dtype})")
        return LabelledImages(np.concatenate([self.images, other.images]),
                              np.concatenate([self.category, other.category]),
                              np.concatenate([self.item_ids, other.item_ids]),
                              {k: np.concatenate([v, other.groups[k]]) for k, v in self.groups.items()},
                              {k: np.concatenate([v, other.present[k]]) for k, v in self.present.items()},
                              {k: np.concatenate([self.row_weight(k), other.row_weight(k)])
                               for k in sorted(set(self.weights) | set(other.weights))})

    def fingerprint(self) -> str:
        """A cheap content hash: the same data gives the same string (recorded in the manifest)."""
        h = hashlib.sha256()
        h.update(str(len(self)).encode())
        for arr in (self.category, self.item_ids, *[self.groups[k] for k in sorted(self.groups)]):
            h.update(np.ascontiguousarray(arr).tobytes())
        for k in sorted(self.weights):  # none in the plain case: its hash is that of the labels alone
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.weights[k], dtype=np.float32).tobytes())
        if self.images.dtype == np.uint8:
            step = max(1, len(self.images) // 512)
            h.update(np.ascontiguousarray(self.images[::step]).tobytes())
        else:  # file references, and in-memory photos among them (corrections)
            for ref in self.images:
                h.update(ref.tobytes() if isinstance(ref, np.ndarray) else str(ref).encode())
        return h.hexdigest()[:16]



@dataclass
class Split:
    data: LabelledImages
    query: np.ndarray  # (N,) bool: query photos (the rest is gallery) for retrieval metrics


@dataclass
class PreparedData:
    taxonomy: Taxonomy
    train: LabelledImages
    val: Split
    test: Split
    loader: ImageLoader | None = None  # for sets of image files (DeepFashion)
    plain_test: np.ndarray | None = None  # rows of test that are the plain rendering of each test image
    grey_test: LabelledImages | None = None  # the test images as published (Fashion-MNIST's own benchmark)

def mask_not_applicable(data: LabelledImages, taxonomy: Taxonomy) -> LabelledImages:
    """Masks the groups that do not apply: a row whose category has no such group
    (the taxonomy's ``applies_to``) gets no label for it, so it adds no loss and is not scored. Rows
    without a category keep their labels."""
    table = taxonomy.applicability()
    if table.all():
        return data
    known = data.category >= 0
    groups, present = dict(data.groups), dict(data.present)
    for j, g in enumerate(taxonomy.attribute_groups):
        if g.name not in groups or table[:, j].all():
            continue
        off = known & ~table[np.clip(data.category, 0, None), j]
        if g.exclusive:
            groups[g.name] = np.where(off, MISSING, groups[g.name])
        else:
            present[g.name] = present[g.name] & ~off
    return LabelledImages(data.images, data.category, data.item_ids, groups, present, data.weights)


def from_shop(shop, taxonomy: Taxonomy) -> LabelledImages:
    """FMNIST-shop photos → LabelledImages (category + the exclusive colour group)."""
    groups = {}
    for g in taxonomy.attribute_groups:
        groups[g.name] = shop.colour.copy() if g.name == "colour" else np.full(len(shop), MISSING, np.int64)
    return LabelledImages(shop.images, shop.category.copy(), shop.item_ids.copy(), groups, {})


class TorchImages(Dataset):
    def __init__(self, data: LabelledImages, transform: Callable[[np.ndarray], torch.Tensor],
                 loader: ImageLoader | None = None) -> None:
        self.data, self.transform, self.loader = data, transform, loader

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        img = self.data.images[i]
        if self.loader is not None:
            img = self.loader(img)
        item = {"image": self.transform(img), "category": int(self.data.category[i]),
                "item_id": int(self.data.item_ids[i])}
        for g, arr in self.data.groups.items():
            item[f"group/{g}"] = torch.as_tensor(arr[i])
            if g in self.data.present:
                item[f"present/{g}"] = bool(self.data.present[g][i])
        for k, w in self.data.weights.items():
            item[f"weight/{k}"] = torch.tensor(float(w[i]))
        return item


class TensorBatches:
    """An in-memory uint8 set held as tensors on the training device: a batch is an index gather
    plus :class:`training.transforms.BatchAugment` — no per-image Python, no DataLoader workers.
    Yields the same dict as a DataLoader over :class:`TorchImages` would."""

    def __init__(self, data: LabelledImages, augment: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device) -> None:
        if data.images.dtype != np.uint8:
            raise ValueError("TensorBatches needs in-memory uint8 images (use TorchImages for file paths)")
        self.augment, self.device = augment, device
        self.images = torch.from_numpy(np.ascontiguousarray(data.images)).to(device)
        self.labels = {"category": torch.from_numpy(data.category).to(device),
                       "item_id": torch.from_numpy(data.item_ids).to(device)}
        for g, arr in data.groups.items():
            self.labels[f"group/{g}"] = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
            if g in data.present:
                self.labels[f"present/{g}"] = torch.from_numpy(data.present[g]).to(device)
        for k, w in data.weights.items():
            self.labels[f"weight/{k}"] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(device)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.device)
        out = {k: v[idx] for k, v in self.labels.items()}
        out["image"] = self.augment(self.images[idx])
        return out

    def iterate(self, batch_sampler):
        """Endless batches from a (re-iterable) batch sampler of equal-sized batches. Each pass goes to
        the device as one index tensor, so a step never copies (and waits) on its own."""
        while True:
            passes = torch.as_tensor(np.asarray(list(batch_sampler), dtype=np.int64), device=self.device)
            for indices in passes:
                yield self.batch(indices)
