"""DeepFashion readers: Category & Attribute Prediction benchmark and In-shop Clothes Retrieval.

Files (as distributed, first line a count, second line the column names, then whitespace-separated rows):
  Category & Attribute:  Anno/list_category_cloth.txt  (name, type 1 upper / 2 lower / 3 full body)
                         Anno/list_category_img.txt    (image, 1-based category)
                         Anno/list_attr_cloth.txt      (attribute name — may contain spaces —, type)
                         Anno/list_attr_img.txt        (image, one of -1/0/1 per attribute)
                         Anno/list_bbox.txt            (image, x_1 y_1 x_2 y_2)
                         Eval/list_eval_partition.txt  (image, train/val/test)
  In-shop:               Eval/list_eval_partition.txt  (image, item_id, train/query/gallery)
                         Anno/list_bbox_inshop.txt     (image, clothes_type, pose_type, x_1 y_1 x_2 y_2), optional
In-shop has no validation partition: a seeded tenth of its train items is held out for it
(``inshop_partition``); query/gallery stays the test set.
Labels are mapped onto a taxonomy by name; a group an image has no (or an ambiguous) value for is
MISSING, so it adds no loss.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from schemas.taxonomy import Taxonomy
from training.config import TrainConfig
from training.data import LabelledImages, PreparedData, Split
from training.losses import MISSING


def _rows(path: Path, min_cols: int) -> list[list[str]]:
    """Skip the count and header lines; check the declared count."""
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and a header line")
    try:
        declared = int(lines[0].strip())
    except ValueError as exc:
        raise ValueError(f"{path}: first line must be the number of entries, got {lines[0]!r}") from exc
    rows = [ln.split() for ln in lines[2:] if ln.strip()]
    if len(rows) != declared:
        raise ValueError(f"{path}: header declares {declared} entries, found {len(rows)}")
    for r in rows:
        if len(r) < min_cols:
            raise ValueError(f"{path}: malformed line {' '.join(r)!r}")
    return rows


def _named_rows(path: Path) -> list[tuple[str, int]]:
    """'name with spaces   type' rows (list_category_cloth / list_attr_cloth)."""
    out = []
    for r in _rows(path, 2):
        out.append((" ".join(r[:-1]), int(r[-1])))
    return out


def norm_name(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


@dataclass
class CategoryAttributeRecords:
    images: list[str]  # relative image paths
    category_names: list[str]  # from list_category_cloth.txt, in file order
    category_types: list[int]
    category: np.ndarray  # (N,) 0-based index into category_names
    attribute_names: list[str]
    attribute_types: list[int]
    attributes: np.ndarray  # (N, A) int8 in {-1, 0, 1}
    bbox: np.ndarray  # (N, 4) int32 x1 y1 x2 y2
    partition: np.ndarray  # (N,) str: train / val / test


def read_category_attribute(root: Path | str) -> CategoryAttributeRecords:
    root = Path(root)
    anno, ev = root / "Anno", root / "Eval"
    cats = _named_rows(anno / "list_category_cloth.txt")
    attrs = _named_rows(anno / "list_attr_cloth.txt")
    cat_img = _rows(anno / "list_category_img.txt", 2)
    images = [r[0] for r in cat_img]
    index = {name: i for i, name in enumerate(images)}
    if len(index) != len(images):
        raise ValueError("list_category_img.txt lists an image twice")
    category = np.array([int(r[1]) - 1 for r in cat_img], dtype=np.int64)
    if category.min(initial=0) < 0 or category.max(initial=0) >= len(cats):
        raise ValueError("list_category_img.txt has category labels outside list_category_cloth.txt")

    def aligned(rows: list[list[str]], what: str) -> list[list[str]]:
        out: list[list[str] | None] = [None] * len(images)
        for r in rows:
            if r[0] not in index:
                raise ValueError(f"{what} lists {r[0]!r}, which list_category_img.txt does not")
            out[index[r[0]]] = r
        missing = [images[i] for i, r in enumerate(out) if r is None]
        if missing:
            raise ValueError(f"{what} lacks {len(missing)} image(s), e.g. {missing[0]!r}")
        return [r for r in out if r is not None]  # all present (checked above)

    attr_rows = aligned(_rows(anno / "list_attr_img.txt", 1 + len(attrs)), "list_attr_img.txt")
    attributes = np.array([[int(v) for v in r[1:]] for r in attr_rows], dtype=np.int8)
    if attributes.shape[1] != len(attrs):
        raise ValueError(f"list_attr_img.txt rows have {attributes.shape[1]} values for {len(attrs)} attributes")
    bbox = np.array([[int(v) for v in r[1:5]] for r in aligned(_rows(anno / "list_bbox.txt", 5), "list_bbox.txt")],
                    dtype=np.int32)
    part = np.array([r[1] for r in aligned(_rows(ev / "list_eval_partition.txt", 2), "list_eval_partition.txt")])
    bad = set(part) - {"train", "val", "test"}
    if bad:
        raise ValueError(f"list_eval_partition.txt: unknown partitions {sorted(bad)}")
    return CategoryAttributeRecords(images, [c[0] for c in cats], [c[1] for c in cats], category,
                                    [a[0] for a in attrs], [a[1] for a in attrs], attributes, bbox, part)


@dataclass
class InShopRecords:
    images: list[str]
    item_ids: list[str]
    partition: np.ndarray  # train / query / gallery
    bbox: np.ndarray | None  # (N, 4) or None when list_bbox_inshop.txt is absent


def read_inshop(root: Path | str) -> InShopRecords:
    root = Path(root)
    rows = _rows(root / "Eval" / "list_eval_partition.txt", 3)
    part = np.array([r[2] for r in rows])
    bad = set(part) - {"train", "query", "gallery"}
    if bad:
        raise ValueError(f"In-shop list_eval_partition.txt: unknown partitions {sorted(bad)}")
    images = [r[0] for r in rows]
    bbox = None
    bbox_file = root / "Anno" / "list_bbox_inshop.txt"
    if bbox_file.is_file():
        by_name = {r[0]: [int(v) for v in r[3:7]] for r in _rows(bbox_file, 7)}
        missing = [im for im in images if im not in by_name]
        if missing:
            raise ValueError(f"list_bbox_inshop.txt lacks {missing[0]!r}")
        bbox = np.array([by_name[im] for im in images], dtype=np.int32)
    return InShopRecords(images, [r[1] for r in rows], part, bbox)


def category_attribute_labels(rec: CategoryAttributeRecords, taxonomy: Taxonomy, root: Path
                              ) -> tuple[LabelledImages, np.ndarray]:
    """Map onto the taxonomy; returns the labelled set (paths + bbox, loaded lazily) and its partitions."""
    tax_cat = {norm_name(n): i for i, n in enumerate(taxonomy.category_names)}
    cat_map = np.array([tax_cat.get(norm_name(n), MISSING) for n in rec.category_names], dtype=np.int64)
    category = cat_map[rec.category]
    groups: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    attr_index = {norm_name(n): j for j, n in enumerate(rec.attribute_names)}
    for g in taxonomy.attribute_groups:
        cols = [attr_index.get(norm_name(v)) for v in g.values]
        have = [c is not None for c in cols]
        sub = np.stack([rec.attributes[:, c] if c is not None else np.zeros(len(rec.images), np.int8)
                        for c in cols], axis=1) > 0
        if g.exclusive:
            n_pos = sub.sum(axis=1)
            # exactly one value: a label; none or several: the group is missing for that image
            groups[g.name] = np.where(n_pos == 1, sub.argmax(axis=1), MISSING).astype(np.int64)
        else:
            groups[g.name] = sub.astype(np.float32)
            present[g.name] = np.full(len(rec.images), any(have), dtype=bool)
    paths = np.empty(len(rec.images), dtype=object)
    for i, (im, b) in enumerate(zip(rec.images, rec.bbox, strict=True)):
        paths[i] = (str(root / im), tuple(int(v) for v in b))
    return LabelledImages(paths, category, np.full(len(rec.images), MISSING, np.int64), groups, present), rec.partition


def inshop_labels(rec: InShopRecords, taxonomy: Taxonomy, root: Path, item_offset: int = 0
                  ) -> tuple[LabelledImages, np.ndarray]:
    ids = {k: i + item_offset for i, k in enumerate(dict.fromkeys(rec.item_ids))}
    n = len(rec.images)
    groups = {g.name: (np.full(n, MISSING, np.int64) if g.exclusive else np.zeros((n, len(g.values)), np.float32))
              for g in taxonomy.attribute_groups}
    present = {g.name: np.zeros(n, bool) for g in taxonomy.attribute_groups if not g.exclusive}
    paths = np.empty(n, dtype=object)
    for i, im in enumerate(rec.images):
        paths[i] = (str(root / im), tuple(int(v) for v in rec.bbox[i]) if rec.bbox is not None else None)
    return (LabelledImages(paths, np.full(n, MISSING, np.int64), np.array([ids[k] for k in rec.item_ids], np.int64),
                           groups, present), rec.partition)


def load_cropped(ref: tuple[str, tuple[int, int, int, int] | None] | np.ndarray,
                 max_pixels: int = 40_000_000) -> np.ndarray:
    """Open an image, crop it to its bounding box (clamped to the image), return RGB uint8. A photo
    already in memory (a human correction added to the training split) is returned as it is."""
    if isinstance(ref, np.ndarray):
        return ref
    path, box = ref
    with Image.open(path) as file:
        if file.width * file.height > max_pixels:
            raise ValueError(f"{path}: {file.width}x{file.height} exceeds {max_pixels} pixels")
        im = file.convert("RGB")
        if box is not None:
            x1, y1, x2, y2 = box
            x1, y1 = max(0, min(x1, im.width - 1)), max(0, min(y1, im.height - 1))
            x2, y2 = max(x1 + 1, min(x2, im.width)), max(y1 + 1, min(y2, im.height))
            im = im.crop((x1, y1, x2, y2))
        return np.asarray(im, dtype=np.uint8).copy()


def concat(a: LabelledImages, b: LabelledImages) -> LabelledImages:
    return LabelledImages(
        np.concatenate([a.images, b.images]), np.concatenate([a.category, b.category]),
        np.concatenate([a.item_ids, b.item_ids]),
        {k: np.concatenate([a.groups[k], b.groups[k]]) for k in a.groups},
        {k: np.concatenate([a.present[k], b.present[k]]) for k in a.present},
    )


# In-shop publishes train and query/gallery partitions only. Validation (early stopping, best weights,
# threshold calibration) takes this share of the *train* items, never a test (query/gallery) item, so
# the published query/gallery stays the untouched test set.
INSHOP_VAL_FRACTION = 0.1


def inshop_val_items(item_ids: list[str], partition: np.ndarray, seed: int,
                     fraction: float = INSHOP_VAL_FRACTION) -> set[str]:
    """The train-partition items held out for validation: a seeded draw of whole items (all their photos
    go together), ``fraction`` of them, at least one and never all (training keeps one item at least)."""
    train_items = sorted({k for k, p in zip(item_ids, partition, strict=True) if p == "train"})
    n = len(train_items)
    if n < 2:
        return set()
    k = min(n - 1, max(1, int(round(fraction * n))))
    order = np.random.default_rng(seed).permutation(n)[:k]
    return {train_items[i] for i in order}


def inshop_partition(rec: InShopRecords, seed: int, fraction: float = INSHOP_VAL_FRACTION) -> np.ndarray:
    """The In-shop partition with validation: ``val_query`` (each held-out item's first photo) and
    ``val_gallery`` (its other photos) carved from ``train``; ``query`` and ``gallery`` (the test) as
    published."""
    held = inshop_val_items(rec.item_ids, rec.partition, seed, fraction)
    part = rec.partition.astype(object).copy()
    seen: set[str] = set()
    for i, (item, p) in enumerate(zip(rec.item_ids, rec.partition, strict=True)):
        if p == "train" and item in held:
            part[i] = "val_gallery" if item in seen else "val_query"
            seen.add(item)
    return part.astype(str)


def _category_attribute(cfg: TrainConfig, taxonomy: Taxonomy
                               ) -> tuple[LabelledImages, np.ndarray]:
    ca_root = Path(cfg.data_dir) / "category"
    return category_attribute_labels(read_category_attribute(ca_root), taxonomy, ca_root)


def _inshop(cfg: TrainConfig, taxonomy: Taxonomy) -> tuple[LabelledImages, np.ndarray] | None:
    root = Path(cfg.data_dir) / "inshop"
    if not root.is_dir():
        return None
    rec = read_inshop(root)
    shop, _ = inshop_labels(rec, taxonomy, root)
    return shop, inshop_partition(rec, cfg.seed)


def _test_split(ca: LabelledImages, part: np.ndarray, inshop: tuple[LabelledImages, np.ndarray] | None) -> Split:
    """Category & Attribute test partition + In-shop query/gallery (retrieval): the fixed test set."""
    test = ca.subset(np.flatnonzero(part == "test"))
    test_q = np.zeros(len(test), bool)
    if inshop is not None:
        shop, spart = inshop
        qg = np.flatnonzero(np.isin(spart, ("query", "gallery")))
        test, test_q = concat(test, shop.subset(qg)), np.r_[test_q, spart[qg] == "query"]
    return Split(test, test_q)


def deepfashion_test(cfg: TrainConfig, taxonomy: Taxonomy) -> Split:
    """The fixed DeepFashion evaluation set alone (no training rows built): what every model trained for
    DeepFashion is measured on; depends on the annotation files and the taxonomy only."""
    ca, part = _category_attribute(cfg, taxonomy)
    return _test_split(ca, part, _inshop(cfg, taxonomy))


def prepare_deepfashion(cfg: TrainConfig, taxonomy: Taxonomy) -> PreparedData:
    """cfg.data_dir holds `category/` (Category & Attribute) and optionally `inshop/` (In-shop).

    train: C&A train + In-shop train items not held out; val: C&A val + the held-out In-shop train
    items (``inshop_partition``); test: C&A test + In-shop query/gallery. Validation never sees a test
    item, and In-shop's train and query/gallery items are disjoint as published."""
    ca, part = _category_attribute(cfg, taxonomy)
    train, val = (ca.subset(np.flatnonzero(part == p)) for p in ("train", "val"))
    val_q = np.zeros(len(val), bool)
    inshop = _inshop(cfg, taxonomy)
    if inshop is not None:
        shop, spart = inshop
        train = concat(train, shop.subset(np.flatnonzero(spart == "train")))
        held = np.flatnonzero(np.isin(spart, ("val_query", "val_gallery")))
        val, val_q = concat(val, shop.subset(held)), np.r_[val_q, spart[held] == "val_query"]
    return PreparedData(taxonomy, train, Split(val, val_q), _test_split(ca, part, inshop), loader=load_cropped)
