"""Shadow evaluation: a candidate also predicts a share of live listings; its answers are stored apart.

The share is chosen by a hash of the listing id, so the same listings are sampled on every worker and
on every retry. Nothing the shadow says becomes a tag or a review item: rows go to
`shadow_predictions`, beside what the active model answered for the same listing and group, for
`enrich models compare` and the gate.
"""
from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

import psycopg

from schemas.enrichment import Enrichment, TagSource
from worker.store import listings_by_id

if TYPE_CHECKING:
    from worker.pipeline import Enricher  # imports torch, which cpu and train workers never load

log = logging.getLogger(__name__)


def in_share(listing_id: str, share: float) -> bool:
    """Deterministic sampling: the same listing is in or out on every worker and every retry."""
    h = int.from_bytes(hashlib.sha256(listing_id.encode()).digest()[:8], "big")
    return h < share * 2**64


def answers(enr: Enrichment) -> dict[str, tuple[str, float]]:
    """What a model said per group: its tag where confident, else its best review candidate."""
    out = {g: (t.value, t.confidence) for g, t in enr.tags.items()
           if t.source is TagSource.predicted and t.confidence is not None}  # TagValue: predicted ones have one
    for r in enr.review:
        out.setdefault(r.group, (r.candidates[0][0], float(r.candidates[0][1])))
    return out


def run_shadow(conn: psycopg.Connection, shadow: Enricher, active: list[Enrichment], share: float) -> int:
    """Predict the sampled listings of a finished batch with the shadow Enricher; returns rows stored."""
    chosen = {e.listing_id: e for e in active if in_share(e.listing_id, share)}
    if not chosen:
        return 0
    out, _rows = shadow.infer(listings_by_id(conn, list(chosen)))
    conn.commit()
    rows = []
    for enr in out.enriched:
        served = answers(chosen[enr.listing_id])
        for group, (value, conf) in answers(enr).items():
            active_value = served.get(group, (None, 0.0))[0]
            rows.append((enr.model_version, enr.listing_id, group, value, conf, chosen[enr.listing_id].model_version,
                         active_value))
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO shadow_predictions (model_version, listing_id, tag_group, value, confidence,
                                                active_version, active_value)
               VALUES (%s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (model_version, listing_id, tag_group)
               DO UPDATE SET value = EXCLUDED.value, confidence = EXCLUDED.confidence,
                             active_version = EXCLUDED.active_version, active_value = EXCLUDED.active_value,
                             created_at = now()""",
            rows,
        )
    log.info("shadow %s predicted %d of %d listings", shadow.model_version, len(out.enriched), len(active))
    return len(rows)
