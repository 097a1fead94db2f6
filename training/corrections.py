"""Human corrections as training rows: the corrected labels of a listing on its first photo that loads.

``correction_labels`` reads the latest corrected labels from Postgres; ``corrections_to_images`` turns
them into rows, given a ``load`` function for image URIs (the CLI passes the worker's guarded fetcher, so
training obeys the same allow-list and limits as enrichment). Groups a listing has no correction for stay
MISSING (masked: they add no loss); listings have no retrieval identity here (item id MISSING).

A share of the corrected listings is held out of training (``is_held_out``, ENRICH_CORRECTIONS_HOLDOUT): the
gate measures candidates on them, so the figure is one the candidate never trained on.
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import psycopg
from PIL import Image
from psycopg.rows import dict_row

from schemas.taxonomy import CATEGORY_GROUP, Taxonomy
from training.data import LabelledImages
from training.losses import MISSING

log = logging.getLogger(__name__)


@dataclass
class CorrectionLabel:
    listing_id: str
    group: str  # 'category' or an attribute group
    value: str
    index: int | None  # value's index in the taxonomy (None without a taxonomy)
    images: list[str]  # the listing's image URIs (empty if the listing is unknown)
    corrected_at: datetime


HOLDOUT_SELECTORS = (None, "train", "eval")


def is_held_out(listing_id: str, share: float) -> bool:
    """Whether a corrected listing is kept out of training for evaluation: a hash of its id, so a listing stays
    on its side as corrections grow (all its groups together). ``share`` 0: none is."""
    digest = hashlib.sha256(f"holdout:{listing_id}".encode()).hexdigest()
    return int(digest[:8], 16) / 16 ** 8 < share


def correction_labels(conn: psycopg.Connection, taxonomy: Taxonomy | None = None, holdout: str | None = None,
                      share: float = 0.0) -> list[CorrectionLabel]:
    """The latest human correction per (listing, group), as extra training labels.

    With a taxonomy, labels for unknown groups or values are dropped (logged) and indices filled in.
    ``holdout``: None every listing's labels; ``"train"`` only listings not held out at ``share``
    (``is_held_out``); ``"eval"`` only the held-out ones.
    """
    if holdout not in HOLDOUT_SELECTORS:
        raise ValueError(f"holdout must be one of {HOLDOUT_SELECTORS}, not {holdout!r}")
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT DISTINCT ON (c.listing_id, c.tag_group) c.listing_id, c.tag_group, c.new_value,"
            " c.corrected_at, COALESCE(l.event -> 'images', '[]'::jsonb) AS images"
            " FROM corrections c LEFT JOIN listings l ON l.listing_id = c.listing_id"
            " ORDER BY c.listing_id, c.tag_group, c.corrected_at DESC, c.received_at DESC")
        rows = cur.fetchall()
    out, dropped = [], 0
    for r in rows:
        if holdout is not None and is_held_out(r["listing_id"], share) != (holdout == "eval"):
            continue
        idx = None
        if taxonomy is not None:
            values = taxonomy.category_names if r["tag_group"] == CATEGORY_GROUP else (
                taxonomy.group(r["tag_group"]).values if r["tag_group"] in taxonomy.group_names else None)
            if values is None or r["new_value"] not in values:
                dropped += 1
                continue
            idx = values.index(r["new_value"])
        out.append(CorrectionLabel(r["listing_id"], r["tag_group"], r["new_value"], idx, list(r["images"]),
                                   r["corrected_at"]))
    if dropped:
        log.info("dropped %d correction(s) outside taxonomy %s", dropped, taxonomy.name if taxonomy else "")
    return out


def corrections_to_images(labels: list[CorrectionLabel], taxonomy: Taxonomy, load: Callable[[str], Image.Image],
                          size: int) -> LabelledImages:
    """One row per corrected listing: its first loadable photo, resized to size×size RGB uint8.

    ``labels`` need taxonomy indices (``correction_labels(conn, taxonomy)``). Listings none of whose
    photos load are skipped and counted in the log, with the first reason.
    """
    by_listing: dict[str, list[CorrectionLabel]] = defaultdict(list)
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
    out_groups: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    for group in taxonomy.attribute_groups:
        idx = np.asarray(groups[group.name], dtype=np.int64)
        if group.exclusive:
            out_groups[group.name] = idx
        else:  # one corrected value says nothing about the group's other values: no label
            out_groups[group.name] = np.zeros((n, len(group.values)), np.float32)
            present[group.name] = np.zeros(n, dtype=bool)
    return LabelledImages(
        images=np.stack(images) if n else np.zeros((0, size, size, 3), np.uint8),
        category=np.asarray(category, dtype=np.int64), item_ids=np.full(n, MISSING, np.int64),
        groups=out_groups, present=present,
    )
