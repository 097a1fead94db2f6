"""Human corrections as training rows: the corrected labels of a listing on its first photo that loads.

Pure data in, data out: the caller passes the labels (``model.registry.correction_labels``) and a
``load`` function for image URIs (the CLI passes the worker's guarded fetcher, so training obeys the same
allow-list and limits as enrichment). Groups a listing has no correction for stay MISSING (seed 001's
masks: they add no loss); listings have no retrieval identity here (item id MISSING).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable

import numpy as np
from PIL import Image

from schemas.taxonomy import CATEGORY_GROUP, Taxonomy
from training.data import LabelledImages
from training.losses import MISSING

log = logging.getLogger(__name__)


def corrections_to_images(labels, taxonomy: Taxonomy, load: Callable[[str], Image.Image],
                          size: int) -> LabelledImages:
    """One row per corrected listing: its first loadable photo, resized to size×size RGB uint8.

    ``labels`` need taxonomy indices (``correction_labels(conn, taxonomy)``). Listings none of whose
    photos load are skipped and counted in the log, with the first reason.
    """
    by_listing: dict[str, list] = defaultdict(list)
    for lab in labels:
        if lab.index is None:
            raise ValueError(f"correction for {lab.listing_id}/{lab.group} has no taxonomy index; "
                             "read them with correction_labels(conn, taxonomy)")
        by_listing[lab.listing_id].append(lab)
    images, category = [], []
    groups: dict[str, list] = {g: [] for g in taxonomy.group_names}
    skipped, first_reason = 0, ""
    for listing_id, labs in sorted(by_listing.items()):
        photo = None
        for uri in labs[0].images:
            try:
                photo = load(uri).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                break
            except Exception as exc:  # any unloadable photo: try the next one, never stop training
                first_reason = first_reason or f"{listing_id}: {exc}"
        if photo is None:
            skipped += 1
            first_reason = first_reason or f"{listing_id}: no images"
            continue
        given = {lab.group: lab.index for lab in labs}
        images.append(np.asarray(photo, dtype=np.uint8))
        category.append(given.get(CATEGORY_GROUP, MISSING))
        for g in taxonomy.group_names:
            groups[g].append(given.get(g, MISSING))
    if skipped:
        log.warning("corrections: %d listing(s) without a loadable photo skipped (first: %s)", skipped, first_reason)
    log.info("corrections: %d listing(s) become training rows", len(images))
    n = len(images)
    out_groups, present = {}, {}
    for g in taxonomy.attribute_groups:
        idx = np.asarray(groups[g.name], dtype=np.int64)
        if g.exclusive:
            out_groups[g.name] = idx
        else:  # one corrected value says nothing about the group's other values: no label
            out_groups[g.name] = np.zeros((n, len(g.values)), np.float32)
            present[g.name] = np.zeros(n, dtype=bool)
    return LabelledImages(
        images=np.stack(images) if n else np.zeros((0, size, size, 3), np.uint8),
        category=np.asarray(category, dtype=np.int64), item_ids=np.full(n, MISSING, np.int64),
        groups=out_groups, present=present,
    )
