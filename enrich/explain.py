"""Why the model gave a listing its tags: one Grad-CAM heat-map PNG per predicted tag, the library call behind
`enrich explain` (enrich/explain_cli.py).

The listing's first photo is fetched through the worker's guards (allow-listed sources, size and pixel
limits), the model explains each predicted tag by Grad-CAM (model/explain.py) and the overlays are written
as ``<listing>-<group>-<value>.png``. Seller and corrected tags are not the model's, so they get none.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.rows import class_row

from core.config import Settings
from core.images import ImageError, load_image
from model.explain import explain, explanation_filename, overlay_png, target_for
from model.inference import Predictor


class ExplainError(LookupError):
    """The listing cannot be explained (unknown, no photo, no predicted tag, no model)."""


@dataclass(frozen=True)
class ExplainedTag:
    group: str
    value: str
    confidence: float | None
    tagged_by: str | None  # model version that predicted the tag
    path: Path | None  # None: the model has no output for this group (decided from the text alone)


@dataclass(frozen=True)
class PredictedTag:
    tag_group: str
    value: str
    confidence: float
    model_version: str


def listing_photo_and_tags(conn: psycopg.Connection, listing_id: str) -> tuple[str, list[PredictedTag]]:
    """The listing's first image URI and its predicted tags."""
    found = conn.execute("SELECT event->'images'->>0 FROM listings WHERE listing_id = %s", (listing_id,)).fetchone()
    if found is None:
        raise ExplainError(f"no listing {listing_id!r}")
    with conn.cursor(row_factory=class_row(PredictedTag)) as cur:
        tags = cur.execute("SELECT tag_group, value, confidence, model_version FROM listing_tags"
                           " WHERE listing_id = %s AND source = 'predicted' ORDER BY tag_group",
                           (listing_id,)).fetchall()
    if not tags:
        raise ExplainError(f"listing {listing_id!r} has no predicted tags (seller and corrected tags are not "
                           f"the model's; a pending listing has none yet)")
    (uri,) = found
    if uri is None:
        raise ExplainError(f"listing {listing_id!r} has no image")
    return uri, tags


def explain_listing(conn: psycopg.Connection, listing_id: str, predictor: Predictor, out_dir: Path,
                    settings: Settings) -> list[ExplainedTag]:
    """Write one overlay per predicted tag of the listing into ``out_dir``."""

    uri, tags = listing_photo_and_tags(conn, listing_id)
    try:
        photo = load_image(uri, settings)
    except ImageError as exc:
        raise ExplainError(f"listing {listing_id!r}: its first image cannot be used: {exc}") from exc
    model = predictor.model
    targets = []
    for tag in tags:
        try:
            targets.append(target_for(model, tag.tag_group, tag.value))
        except KeyError:  # decided from the listing's text alone, or a value this model does not have
            pass
    heat = explain(model, predictor.preprocess(photo), targets) if targets else {}  # keyed (group, value)
    done = []
    for tag in tags:
        path = None
        if (tag.tag_group, tag.value) in heat:
            path = overlay_png(photo, heat[(tag.tag_group, tag.value)],
                               Path(out_dir) / explanation_filename(listing_id, tag.tag_group, tag.value))
        done.append(ExplainedTag(tag.tag_group, tag.value, tag.confidence, tag.model_version, path))
    return done
