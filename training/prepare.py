"""Dataset preparation for a training run: the train/validation/test splits of FMNIST-shop, DeepFashion or a
marketplace's own catalogue (training.catalogue), the fixed evaluation set every model is measured on, and extra
training rows (grey photos, corrections)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from core.config import Settings
from schemas.taxonomy import Taxonomy
from training.catalogue import catalogue_test, prepare_catalogue
from training.config import TrainConfig
from training.data import ImageLoader, LabelledImages, PreparedData, Split, from_shop, mask_not_applicable
from training.deepfashion import deepfashion_test, load_cropped, prepare_deepfashion
from training.fmnist import load_fashion_mnist
from training.fmnist_shop import COLOUR_GROUP, build_shop, grey_photos

log = logging.getLogger(__name__)

DATASETS = ("fmnist-shop", "deepfashion", "catalogue")  # the labelled sets this package has readers for


class NoReaderError(RuntimeError):
    """The dataset (e.g. a custom taxonomy's own labelled catalogue) has no reader here."""


def _no_reader(dataset: str) -> NoReaderError:
    return NoReaderError(
        f"Invalid dataset {dataset!r}: no reader for it. Only 'fmnist-shop', 'deepfashion' and 'catalogue' "
        "are supported; a custom taxonomy's own labelled set is read with dataset 'catalogue' (seller tags "
        "from Postgres or a JSONL export).")


@dataclass
class EvaluationSet:
    """The fixed test split of a dataset, and what measuring on it needs."""
    split: Split
    loader: ImageLoader | None = None  # for sets of image files (DeepFashion)
    plain: np.ndarray | None = None  # FMNIST-shop: rows that are the plain rendering of each test image
    grey: LabelledImages | None = None  # FMNIST-shop: the test images as published


def _catalogue_settings(settings: Settings | None) -> Settings:
    if settings is None:
        raise ValueError("dataset 'catalogue' needs the settings: its database (source 'postgres') and the "
                         "image loader's allow-list and limits")
    return settings


def evaluation_set(cfg: TrainConfig, taxonomy: Taxonomy, settings: Settings | None = None) -> EvaluationSet:
    """The fixed evaluation set of ``cfg.dataset`` without building any training rows: the rows
    ``prepare_data(cfg, taxonomy, settings).test`` has. ``settings``: needed by dataset "catalogue" only."""
    if cfg.dataset == "fmnist-shop":
        split, plain, grey = fmnist_shop_test(cfg, taxonomy)
        ev = EvaluationSet(split, None, plain, grey)
    elif cfg.dataset == "deepfashion":
        ev = EvaluationSet(deepfashion_test(cfg, taxonomy), load_cropped)
    elif cfg.dataset == "catalogue":
        ev = EvaluationSet(catalogue_test(cfg, taxonomy, _catalogue_settings(settings)))
    else:
        raise _no_reader(cfg.dataset)
    ev.split = _masked(ev.split, taxonomy)
    return ev


def _masked(split: Split, taxonomy: Taxonomy) -> Split:
    return Split(mask_not_applicable(split.data, taxonomy), split.query)


def fmnist_shop_test(cfg: TrainConfig, taxonomy: Taxonomy) -> tuple[Split, np.ndarray, LabelledImages]:
    """The fixed evaluation set: Fashion-MNIST test items as shop photos (depends only on seed, test_items
    and test_photos_per_item, so every model is measured on the same photos). Also returns the rows
    that are the plain rendering of each test image, and the same test images as published (grey)."""
    xt, yt = load_fashion_mnist(cfg.data_dir, "test")
    idx = (np.arange(len(xt)) if cfg.test_items is None
           else np.random.default_rng(cfg.seed + 2).permutation(len(xt))[:cfg.test_items])
    test = build_shop(xt[idx], yt[idx], taxonomy, photos_per_item=cfg.test_photos_per_item, seed=cfg.seed + 2)
    grey = from_shop(grey_photos(xt[idx], yt[idx]), taxonomy)
    return Split(from_shop(test, taxonomy), test.is_query), test.is_query.copy(), grey


def prepare_fmnist_shop(cfg: TrainConfig, taxonomy: Taxonomy) -> PreparedData:
    """Train/val items from Fashion-MNIST train (disjoint), test items from Fashion-MNIST test."""
    if COLOUR_GROUP not in taxonomy.group_names:
        raise ValueError(f"fmnist-shop needs a {COLOUR_GROUP!r} attribute group in taxonomy {taxonomy.name!r}")
    x, y = load_fashion_mnist(cfg.data_dir, "train")
    order = np.random.default_rng(cfg.seed).permutation(len(x))
    val_idx = order[:cfg.val_items]
    train_idx = order[cfg.val_items:]
    if cfg.train_items is not None:
        train_idx = train_idx[:cfg.train_items]
    t0 = time.perf_counter()
    train = from_shop(build_shop(x[train_idx], y[train_idx], taxonomy, photos_per_item=cfg.photos_per_item,
                                 seed=cfg.seed), taxonomy)
    if cfg.grey_photos:
        train = add_training_rows(train, from_shop(grey_photos(x[train_idx], y[train_idx]), taxonomy),
                                  cfg.grey_repeats)
    val = build_shop(x[val_idx], y[val_idx], taxonomy, photos_per_item=2, seed=cfg.seed + 1)
    test, plain, grey = fmnist_shop_test(cfg, taxonomy)
    log.info("FMNIST-shop built in %.1fs: %d train photos (%d items%s), %d val, %d test",
             time.perf_counter() - t0, len(train), len(train_idx),
             f", +1 grey photo each ×{cfg.grey_repeats}" if cfg.grey_photos else "",
             len(val), len(test.data))
    return PreparedData(taxonomy, train, Split(from_shop(val, taxonomy), val.is_query), test, plain_test=plain,
                        grey_test=grey)


def prepare_data(cfg: TrainConfig, taxonomy: Taxonomy, settings: Settings | None = None) -> PreparedData:
    """The splits of ``cfg.dataset``, with groups that do not apply to a row's category masked (no label: no
    loss, not scored). ``settings``: needed by dataset "catalogue" only (its database and image loader)."""
    if cfg.dataset == "fmnist-shop":
        data = prepare_fmnist_shop(cfg, taxonomy)
    elif cfg.dataset == "deepfashion":
        data = prepare_deepfashion(cfg, taxonomy)
    elif cfg.dataset == "catalogue":
        data = prepare_catalogue(cfg, taxonomy, _catalogue_settings(settings))
    else:
        raise _no_reader(cfg.dataset)
    return replace(data, train=mask_not_applicable(data.train, taxonomy), val=_masked(data.val, taxonomy),
                   test=_masked(data.test, taxonomy))


def add_training_rows(train: LabelledImages, extra: LabelledImages, repeats: int) -> LabelledImages:
    """``extra`` appended ``repeats`` times. In-memory sets: its photos resized to the training photos'
    size. Sets of image files (DeepFashion): its photos join as in-memory photos among the file
    references, which the dataset's loader passes through (``training.deepfashion.load_cropped``)."""
    rows = np.tile(np.arange(len(extra)), max(1, repeats))
    if train.images.dtype != np.uint8:
        refs = np.empty(len(extra), dtype=object)
        for i, photo in enumerate(extra.images):  # one (H, W, 3) array per row, not a 4-d object array
            refs[i] = photo
        return train.concat(replace(extra, images=refs).subset(rows))
    size = train.images.shape[1:3]
    images = extra.images
    if len(images) and images.shape[1:3] != size:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
        images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return train.concat(replace(extra, images=images).subset(rows))
