"""Heat maps for review items, stored by the worker when ENRICH_EXPLAIN_REVIEW is on (off by default).

After a batch's tags are committed, each review item's top candidate is explained by Grad-CAM
(model/explain.py) on the listing's first photo as the model saw it; the overlay is written to
``<data dir>/explanations/<model version>/<listing>-<group>-<value>.png`` and recorded in the
``explanations`` table (one row per listing, group and model version: a batch run again rewrites it).
The console shows it next to the review item. Best effort, like the online neighbours: the tags are
already committed, so a failure here is logged and never fails or retries the batch.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psycopg
import torch
from PIL import Image

from core.config import Settings
from core.files import replaced_file
from model.explain import (
    Target,
    explain_batch,
    explanation_filename,
    overlay_png,
    safe_name,
    target_for,
    tensor_to_image,
)
from schemas.enrichment import ReviewItem

log = logging.getLogger(__name__)
METHOD = "grad-cam"


class ReviewToExplain(NamedTuple):
    listing_id: str
    image: torch.Tensor  # (3, H, W): the listing's first photo from predictor.preprocess
    review: Sequence[ReviewItem]  # the listing's Enrichment.review


def explanations_root(settings: Settings) -> Path:
    return Path(settings.data_dir) / "explanations"


def _write_atomic(path: Path, picture: Image.Image, heat: np.ndarray) -> None:
    """Write the PNG beside its final name, then rename: the console never reads half a file."""
    with replaced_file(path) as tmp:
        overlay_png(picture, heat, tmp)


def _explain_items(predictor, items: Sequence[ReviewToExplain], settings: Settings
                   ) -> list[tuple[str, str, str, str]]:
    """Heat maps → PNG files; returns (listing_id, group, value, uri) per file written."""
    model, manifest = predictor.model, predictor.manifest
    norm = manifest.normalisation
    # (listing id, photo, [(group, value, target)])
    jobs: list[tuple[str, torch.Tensor, list[tuple[str, str, Target]]]] = []
    for listing_id, image, review in items:
        picks = []
        for r in review:
            value = r.candidates[0][0]
            try:
                picks.append((r.group, value, target_for(model, r.group, value)))
            except KeyError:  # a group decided from the text alone: the photo has nothing to show
                log.debug("no heat map for %s/%s of %s: not a model output", r.group, value, listing_id)
        if picks:
            jobs.append((listing_id, image, picks))
    root = explanations_root(settings) / safe_name(manifest.model_version)
    written = []
    step = max(1, settings.batch_size)
    for start in range(0, len(jobs), step):
        chunk = jobs[start:start + step]
        heat = explain_batch(model, torch.stack([j[1] for j in chunk]), [[p[2] for p in j[2]] for j in chunk])
        for (listing_id, image, picks), maps in zip(chunk, heat, strict=True):
            picture = tensor_to_image(image, norm.mean, norm.std)
            for (group, value, _), m in zip(picks, maps, strict=True):
                path = root / explanation_filename(listing_id, group, value)
                _write_atomic(path, picture, m)
                written.append((listing_id, group, value, str(path.resolve())))
    return written


def record_explanations(conn: psycopg.Connection, model_version: str,
                        rows: Sequence[tuple[str, str, str, str]]) -> None:
    """Upsert (listing_id, group, value, uri) rows for one model version, in one transaction."""
    with conn.transaction():
        with conn.cursor() as cur:
            cur.executemany(
                """INSERT INTO explanations (listing_id, tag_group, model_version, value, method, uri)
                   VALUES (%s, %s, %s, %s, %s, %s)
                   ON CONFLICT (listing_id, tag_group, model_version)
                   DO UPDATE SET value = EXCLUDED.value, method = EXCLUDED.method, uri = EXCLUDED.uri,
                                 created_at = now()""",
                [(lid, group, model_version, value, METHOD, uri) for lid, group, value, uri in rows])


def store_explanations(conn: psycopg.Connection, predictor, items: Sequence[ReviewToExplain],
                       settings: Settings) -> int:
    """Explain and record the top candidate of every review item of ``items``; returns the heat maps stored.

    ``items``: (listing_id, first photo's tensor from ``predictor.preprocess``, the Enrichment's review list)
    for listings of a batch whose tags are committed. Does nothing (returns 0) unless
    ``settings.explain_review``; never raises (a failure is logged: the batch stays done). May run on the
    pipeline's writer thread while the same model predicts the next batch on another.
    """
    if not settings.explain_review:
        return 0
    with_review = [it for it in items if it.review]
    if not with_review:
        return 0
    try:
        rows = _explain_items(predictor, with_review, settings)
        if rows:
            record_explanations(conn, predictor.version, rows)
        return len(rows)
    except Exception:
        log.exception("explanations failed for %d listings", len(with_review))
        return 0
