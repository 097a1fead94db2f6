"""Store the review order: `reprioritise` ranks the open review items by expected gain (worker.review_order)
and writes `review_queue.priority`, which the console orders by under ENRICH_REVIEW_ORDER=gain. Beat runs it
on the cpu queue every ENRICH_REVIEW_REPRIORITISE_S; `enrich review-order` runs it by hand.

Items are ranked per (tag group, model version): one answer settles similar questions of the same group, and
embeddings of different models are not comparable. An item without an embedding is ranked by its own
uncertainty (a zero vector is similar to nothing).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import class_row

from core.config import Settings
from worker.review_order import gain_order, uncertainty

log = logging.getLogger(__name__)

NEIGHBOURS = 10  # similar open items one answer is expected to settle, at most
DIVERSITY = 0.5


@dataclass(frozen=True)
class OpenItem:
    """An open review item with its listing's embedding of the item's model version (None: it has none)."""

    id: int
    created_at: datetime
    tag_group: str
    model_version: str
    candidates: list[list[Any]]  # [[value, probability], ...]
    dim: int | None
    vector: bytes | None


def _open_items(conn: psycopg.Connection) -> list[OpenItem]:
    """Every open item, by (tag group, model version)."""
    with conn.cursor(row_factory=class_row(OpenItem)) as cur:
        return cur.execute(
            """SELECT q.id, q.created_at, q.tag_group, q.model_version, q.candidates, e.dim, e.vector
                 FROM review_queue q
                 LEFT JOIN embeddings e ON e.listing_id = q.listing_id AND e.model_version = q.model_version
                WHERE q.resolved_at IS NULL
                ORDER BY q.tag_group, q.model_version, q.id""").fetchall()


def _rank_group(items: list[OpenItem]) -> np.ndarray:
    """Priorities of one group's items, in order."""
    dims = [it.dim for it in items if it.dim]
    dim = max(set(dims), key=dims.count) if dims else 1
    emb = np.zeros((len(items), dim), dtype=np.float32)
    for i, it in enumerate(items):
        if it.dim == dim and it.vector is not None:
            emb[i] = np.frombuffer(it.vector, dtype="<f4")
    u = np.array([uncertainty(it.candidates) for it in items])
    _, priority = gain_order(u, emb, k=NEIGHBOURS, diversity=DIVERSITY)
    return priority


def reprioritise(conn: psycopg.Connection, settings: Settings | None = None) -> int:
    """Rank the open review items and store their priorities in one statement. Returns how many items hold
    a priority from this pass. An item answered, re-queued (new created_at) or locked meanwhile is left as
    it is; the next pass ranks it. Ranked under either ENRICH_REVIEW_ORDER, so switching to "gain" finds
    the priorities in place (`settings` is taken for the tasks' common call shape)."""
    with conn.transaction():
        return _reprioritise(conn)


def _reprioritise(conn: psycopg.Connection) -> int:
    ids: list[int] = []
    created: list[datetime] = []
    priorities: list[float] = []
    for _, grouped in groupby(_open_items(conn), key=lambda it: (it.tag_group, it.model_version)):
        items = list(grouped)
        ids += [it.id for it in items]
        created += [it.created_at for it in items]
        priorities += _rank_group(items).tolist()
    if not ids:
        return 0
    [(ranked, changed)] = conn.execute(
        """WITH u AS (SELECT * FROM unnest(%s::bigint[], %s::timestamptz[], %s::real[]) AS u(id, created_at, p)),
                mine AS (SELECT q.id, u.p, q.priority IS DISTINCT FROM u.p AS changed
                           FROM review_queue q JOIN u ON u.id = q.id AND u.created_at = q.created_at
                          WHERE q.resolved_at IS NULL
                          ORDER BY q.id FOR NO KEY UPDATE OF q SKIP LOCKED),
                upd AS (UPDATE review_queue q SET priority = mine.p FROM mine
                         WHERE q.id = mine.id AND mine.changed RETURNING q.id)
           SELECT (SELECT count(*) FROM mine), (SELECT count(*) FROM upd)""",
        (ids, created, priorities)).fetchall()
    log.info("review order: %d open item(s) ranked, %d priorit(ies) changed", ranked, changed)
    return int(ranked)
