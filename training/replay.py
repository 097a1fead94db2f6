"""Replay: the catalogue listings the active model tagged surest, with its own tags, as training rows beside the
corrections people made.

Corrections come from the marketplace's own photos, and often for a few values only (the confused pair people
fixed). Trained on alone, they also teach a shortcut: "a photo taken like these is one of those values", and the
other values lose accuracy on the marketplace's photos. The replayed listings show the same kind of photos for
every value, labelled by the model where it is surest (benchmarks/retrain_corrections.py measures both).
"""
from __future__ import annotations

import logging

import psycopg

from schemas.taxonomy import CATEGORY_GROUP, Taxonomy
from training.corrections import CorrectionLabel

log = logging.getLogger(__name__)


def confident_labels(conn: psycopg.Connection, taxonomy: Taxonomy, model_version: str, limit: int,
                     min_confidence: float) -> list[CorrectionLabel]:
    """Up to ``limit`` enriched listings whose category ``model_version`` predicted with at least
    ``min_confidence``, surest first, with each of their predicted tags that sure (category and exclusive
    attribute groups of ``taxonomy``). Listings people corrected are left out: their labels are the
    corrections'."""
    if limit <= 0:
        return []
    rows = conn.execute(
        """WITH sure AS (
               SELECT t.listing_id FROM listing_tags t JOIN listings l USING (listing_id)
                WHERE t.tag_group = %(category)s AND t.source = 'predicted' AND t.model_version = %(model)s
                  AND t.confidence >= %(min)s AND l.status = 'enriched'
                  AND NOT EXISTS (SELECT 1 FROM corrections c WHERE c.listing_id = t.listing_id)
                ORDER BY t.confidence DESC, t.listing_id LIMIT %(limit)s)
           SELECT t.listing_id, t.tag_group, t.value, t.updated_at, COALESCE(l.event -> 'images', '[]'::jsonb)
             FROM sure JOIN listing_tags t USING (listing_id) JOIN listings l USING (listing_id)
            WHERE t.source = 'predicted' AND t.model_version = %(model)s AND t.confidence >= %(min)s
            ORDER BY t.listing_id, t.tag_group""",
        {"category": CATEGORY_GROUP, "model": model_version, "min": min_confidence, "limit": limit}).fetchall()
    exclusive = {g.name: g.values for g in taxonomy.attribute_groups if g.exclusive}
    out = []
    for listing_id, group, value, at, images in rows:
        values = taxonomy.category_names if group == CATEGORY_GROUP else exclusive.get(group)
        if values is None or value not in values:
            continue  # the type, non-exclusive groups, values the taxonomy no longer has
        out.append(CorrectionLabel(listing_id, group, value, values.index(value), list(images), at))
    log.info("replay: %d confident label(s) of %s on %d listing(s)", len(out), model_version,
             len({lab.listing_id for lab in out}))
    return out
