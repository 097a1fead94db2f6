"""Store the review order: `reprioritise` ranks the open review items by expected gain (worker.review_order)
and writes `review_queue.priority`, which the console orders by under ENRICH_REVIEW_ORDER=gain. Beat runs it
on the cpu queue every ENRICH_REVIEW_REPRIORITISE_S; `enrich review-order` runs it by hand.

Items are ranked per (tag group, model version): one answer settles similar questions of the same group, and
embeddings of different models are not comparable. An item without an embedding is ranked by its own
uncertainty (a zero vector is similar to nothing).
"""
from __future__ import annotations

import logging
from itertools import groupby

import numpy as np
import psycopg

from worker.review_order import gain_order, uncertainty

log = logging.getLogger(__name__)

NEIGHBOURS = 10  # similar open items one answer is expected to settle, at most
DIVERSITY = 0.5


def _open_items(conn: psycopg.Connection) -> list[tuple]:
    """(id, created_at, tag_group, model_version, candidates, dim, vector) of every open item, grouped."""
    return conn.execute(
        """SELECT q.id, q.created_at, q.tag_group, q.model_version, q.candidates, e.dim, e.vector
             FROM review_queue q
             LEFT JOIN embeddings e ON e.listing_id = q.listing_id AND e.model_version = q.model_version
            WHERE q.resolved_at IS NULL
            ORDER BY q.tag_group, q.model_version, q.id""").fetchall()


def _rank_group(rows: list[tuple]) -> np.ndarray:
    """Priorities of one group's items, in row order."""
    dims = [r[5] for r in rows if r[5]]
    dim = max(set(dims), key=dims.count) if dims else 1
    emb = np.zeros((len(rows), dim), dtype=np.float32)
    for i, r in enumerate(rows):
        if r[5] == dim:
            emb[i] = np.frombuffer(r[6], dtype="<f4")
    u = np.array([uncertainty(r[4]) for r in rows])
    _, priority = gain_order(u, emb, k=NEIGHBOURS, diversity=DIVERSITY)
    return priority


def reprioritise(conn: psycopg.Connection, settings=None) -> int:
    """Rank the open review items and store their priorities in one statement. Returns how many items hold
    a priority from this pass. An item answered, re-queued (new created_at) or locked meanwhile is left as
    it is; the next pass ranks it. Ranked under either ENRICH_REVIEW_ORDER, so switching to "gain" finds
    the priorities in place (`settings` is taken for the tasks' common call shape)."""
    with conn.transaction():
        return _reprioritise(conn)


def _reprioritise(conn: psycopg.Connection) -> int:
    rows = _open_items(conn)
    ids, created, priorities = [], [], []
    for _, group in groupby(rows, key=lambda r: (r[2], r[3])):
        group = list(group)
        ids += [r[0] for r in group]
        created += [r[1] for r in group]
        priorities += _rank_group(group).tolist()
    if not ids:
        return 0
    ranked, changed = conn.execute(
        """WITH u AS (SELECT * FROM unnest(%s::bigint[], %s::timestamptz[], %s::real[]) AS u(id, created_at, p)),
                mine AS (SELECT q.id, u.p, q.priority IS DISTINCT FROM u.p AS changed
                           FROM review_queue q JOIN u ON u.id = q.id AND u.created_at = q.created_at
                          WHERE q.resolved_at IS NULL
                          ORDER BY q.id FOR NO KEY UPDATE OF q SKIP LOCKED),
                upd AS (UPDATE review_queue q SET priority = mine.p FROM mine
                         WHERE q.id = mine.id AND mine.changed RETURNING q.id)
           SELECT (SELECT count(*) FROM mine), (SELECT count(*) FROM upd)""",
        (ids, created, priorities)).fetchone()
    log.info("review order: %d open item(s) ranked, %d priorit(ies) changed", ranked, changed)
    return int(ranked)
