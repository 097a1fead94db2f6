"""Postgres side of similar items: which embeddings to read, and the lifecycle of similar-items versions.

Reads select live embeddings of one model version (`embeddings_query`) and stream them out through binary
COPY (`read_embeddings`, decoded by similar/pgcopy.py); the nightly job writes neighbours with
`pgcopy.copy_neighbours_in` into a version opened here.

Versions (tables in migrations/0001 and 0002):
  similar_items_versions  building → ready → retired   (or failed)
  similar_items_active    model_version → the one version readers see
A new version is written under status 'building' and only becomes visible through one short
transaction that flips similar_items_active; readers that join through the active table in one
statement see the old version or the new one, whole. A crash before the switch leaves the active
row untouched; the leftover 'building' version is marked failed and deleted by the next run.

Old models: `prune_model_version` deletes the embeddings, online rows and versions of a model that was
active once but is neither among the last ENRICH_KEEP_MODEL_VERSIONS active ones nor the one whose
shelves serve (`kept_model_versions`).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import class_row

from core.rows import fetch_row, fetch_value, fetch_values
from similar import pgcopy
from similar.common import SHELF_MODEL_SQL, bytewise_order

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    """Listing ids (fixed-width bytes, sorted bytewise) and their vectors, row-aligned."""

    ids: np.ndarray
    vectors: np.ndarray
    read_at: str | None = None  # now() of the reading transaction (ISO): what was committed by then is here
    read_snapshot: str | None = None  # its pg_snapshot: exactly what it saw (`not_visible_in` reads the rest)

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------------------------
# reading

def _live_filter(alias: str = "l") -> sql.Composable:
    # a listing the seller deleted or sold has status 'deleted' (ListingEvent.deleted)
    return sql.SQL("{}.status <> 'deleted'").format(sql.Identifier(alias))


def embeddings_query(model_version: str, lo: str | None = None, hi: str | None = None,
                     created_after: str | None = None, only_ids: list[str] | None = None,
                     tag_filter: tuple[str, str] | None = None,
                     not_visible_in: str | None = None) -> tuple[sql.Composable, list[Any]]:
    """SELECT listing_id, vector of live listings for one model version (in no particular order:
    sorting 1 GB of vectors in Postgres costs more than sorting the ids in numpy).

    `not_visible_in` (a pg_snapshot, as text): only rows written by transactions that snapshot did not see.
    """
    where = [sql.SQL("e.model_version = %s"), _live_filter()]
    params: list[Any] = [model_version]
    # id ranges compare bytes (COLLATE "C"), the order numpy sorts ids in, whatever the database locale
    if lo is not None:
        where.append(sql.SQL('e.listing_id COLLATE "C" >= %s'))
        params.append(lo)
    if hi is not None:
        where.append(sql.SQL('e.listing_id COLLATE "C" < %s'))
        params.append(hi)
    if created_after is not None:
        where.append(sql.SQL("e.created_at > %s::timestamptz"))
        params.append(created_after)
    if not_visible_in is not None:
        # the range is what the index finds; the visibility test drops the few rows in it the snapshot saw
        where.append(sql.SQL("e.written_xid >= pg_snapshot_xmin(%s::pg_snapshot)"
                             " AND NOT pg_visible_in_snapshot(e.written_xid, %s::pg_snapshot)"))
        params += [not_visible_in, not_visible_in]
    if only_ids is not None:
        where.append(sql.SQL("e.listing_id = ANY(%s)"))
        params.append(list(only_ids))
    join = sql.SQL("")
    if tag_filter is not None:
        join = sql.SQL(" JOIN listing_tags t ON t.listing_id = e.listing_id AND t.tag_group = %s AND t.value = %s")
        group, value = tag_filter
        params = [group, value, *params]
    query = sql.SQL(
        "SELECT e.listing_id, e.vector FROM embeddings e JOIN listings l ON l.listing_id = e.listing_id"
        "{join} WHERE {where}"
    ).format(join=join, where=sql.SQL(" AND ").join(where))
    return query, params


def count_embeddings(conn: psycopg.Connection, model_version: str, lo: str | None = None,
                     hi: str | None = None) -> tuple[int, int | None]:
    """(number of live embeddings, their dimension) for a model version / id range."""
    query, params = embeddings_query(model_version, lo, hi)
    (count,) = fetch_row(conn, sql.SQL("SELECT count(*) FROM ({}) q").format(query), params)
    # one dimension per model version (the reader checks every row against it): no pass over the vectors
    dim = fetch_value(conn, "SELECT dim FROM embeddings WHERE model_version = %s LIMIT 1", (model_version,))
    return int(count), (int(dim) if count and dim is not None else None)


def read_embeddings(conn: psycopg.Connection, model_version: str, lo: str | None = None,
                    hi: str | None = None, *, created_after: str | None = None,
                    only_ids: list[str] | None = None, tag_filter: tuple[str, str] | None = None,
                    not_visible_in: str | None = None, expected: int | None = None,
                    progress: Callable[[int], object] | None = None,
                    sink: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Embeddings:
    """Stream live embeddings of one model version (optionally an id range) into numpy, ids sorted bytewise.

    With `sink`, rows are handed to `sink(ids, vectors)` in chunks as they arrive and not kept
    (`pgcopy.copy_vectors_out`): the result holds the ids only, in arrival order (not sorted), and no vectors.

    Runs in one REPEATABLE READ transaction so the rows, `read_at` and `read_snapshot` come from one snapshot.
    `expected`: about how many rows (the array is allocated once). `progress(n)` is called with the number
    of rows decoded per batch.
    """
    fresh = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if fresh:  # otherwise we are inside the caller's transaction and share its snapshot
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        # one backend streams the rows: parallel workers would only pass every row through a queue
        # to it and take CPU from the decoding client
        conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        query, params = embeddings_query(model_version, lo, hi, created_after, only_ids, tag_filter, not_visible_in)
        now, snapshot = fetch_row(conn, "SELECT now(), pg_current_snapshot()::text")
        read_at = now.isoformat()
        # one dimension per model version; the decoder checks every row against it
        dim = fetch_value(conn, "SELECT dim FROM embeddings WHERE model_version = %s LIMIT 1", (model_version,))
        if dim is None:
            return Embeddings(np.array([], dtype="S1"), np.empty((0, 0), np.float32), read_at, snapshot)
        ids, vectors = pgcopy.copy_vectors_out(conn, query, params, dim, capacity=expected or 1024,
                                               progress=progress, sink=sink)
    if sink is None and len(ids) > 1 and not (ids[1:] >= ids[:-1]).all():
        # one gather: the transient copy is no larger than the index built from them next
        order = bytewise_order(ids)
        ids, vectors = ids[order], vectors[order]
    return Embeddings(ids, vectors, read_at, snapshot)


def sample_embeddings(conn: psycopg.Connection, model_version: str, rows: int, total: int,
                      seed: int = 1234) -> np.ndarray:
    """About `rows` vectors of the model version from random table pages (TABLESAMPLE SYSTEM): a training
    sample for k-means without a pass over the whole table. Deleted listings may be in it (harmless)."""
    percent = min(100.0, 100.0 * 1.2 * rows / max(total, 1))
    got = fetch_values(conn, "SELECT vector FROM embeddings TABLESAMPLE SYSTEM (%s) REPEATABLE (%s)"
                       " WHERE model_version = %s LIMIT %s", (percent, seed, model_version, rows))
    if not got:
        return np.empty((0, 0), np.float32)
    return np.frombuffer(b"".join(got), "<f4").reshape(len(got), -1)


# ---------------------------------------------------------------------------------------------
# versions

@dataclass(frozen=True)
class Version:
    """One row of similar_items_versions."""

    version: int
    model_version: str
    status: str  # building, ready, retired or failed
    k: int
    params: dict[str, Any]  # spec, count, snapshot; shards and what each wrote when sharded; error


def version_info(conn: psycopg.Connection, version: int) -> Version | None:
    with conn.cursor(row_factory=class_row(Version)) as cur:
        return cur.execute("SELECT version, model_version, status, k, params FROM similar_items_versions"
                           " WHERE version = %s", (version,)).fetchone()


def stale_building(conn: psycopg.Connection, model_version: str) -> list[int]:
    """Versions of the model still 'building' (a run that crashed or was killed, or one running now)."""
    return fetch_values(conn, "SELECT version FROM similar_items_versions WHERE model_version = %s"
                              " AND status = 'building'", (model_version,))


def create_version(conn: psycopg.Connection, model_version: str, k: int, params: dict[str, Any],
                   snapshot_at: str | None) -> int:
    """Insert a 'building' version row and commit it (the work below may take minutes)."""
    with conn.transaction():
        (version,) = fetch_row(
            conn,
            "INSERT INTO similar_items_versions (model_version, status, k, params, snapshot_at)"
            " VALUES (%s, 'building', %s, %s, %s::timestamptz) RETURNING version",
            (model_version, k, json.dumps(params), snapshot_at),
        )
    return int(version)


def update_version_params(conn: psycopg.Connection, version: int, params: dict[str, Any]) -> None:
    with conn.transaction():
        conn.execute("UPDATE similar_items_versions SET params = params || %s::jsonb WHERE version = %s",
                     (json.dumps(params), version))


def mark_failed(conn: psycopg.Connection, versions: list[int], reason: str) -> None:
    """A version that will never be switched to: mark it failed and drop its rows.

    Only versions still 'building' are touched: an error after the switch (say, while pruning) must not
    empty the shelves that now serve.
    """
    if not versions:
        return
    with conn.transaction():
        conn.execute("DELETE FROM similar_items WHERE version IN (SELECT version FROM similar_items_versions"
                     " WHERE version = ANY(%s) AND status = 'building')", (versions,))
        conn.execute(
            "UPDATE similar_items_versions SET status = 'failed', finished_at = now(),"
            " params = params || jsonb_build_object('error', %s::text)"
            " WHERE version = ANY(%s) AND status = 'building'",
            (reason, versions),
        )
    log.warning("similar-items versions %s marked failed: %s", versions, reason)


def version_row_count(conn: psycopg.Connection, version: int) -> int:
    (count,) = fetch_row(conn, "SELECT count(*) FROM similar_items WHERE version = %s", (version,))
    return int(count)


def switch_active(conn: psycopg.Connection, version: int) -> int | None:
    """Make `version` the one readers see, in one transaction. Returns the version it replaced."""
    with conn.transaction():
        row = conn.execute(
            "SELECT model_version, status FROM similar_items_versions WHERE version = %s FOR UPDATE", (version,)
        ).fetchone()
        model_version, status = row or (None, None)
        if status != "building":
            raise RuntimeError(f"similar-items version {version} is not building (status {status})")
        # lock the active row so two switches of one model version serialise
        old = fetch_value(conn, "SELECT version FROM similar_items_active WHERE model_version = %s FOR UPDATE",
                          (model_version,))
        conn.execute("UPDATE similar_items_versions SET status = 'ready', finished_at = now() WHERE version = %s",
                     (version,))
        conn.execute(
            "INSERT INTO similar_items_active (model_version, version) VALUES (%s, %s)"
            " ON CONFLICT (model_version) DO UPDATE SET version = EXCLUDED.version, switched_at = now()",
            (model_version, version),
        )
        conn.execute(
            "UPDATE similar_items_versions SET status = 'retired'"
            " WHERE model_version = %s AND status = 'ready' AND version <> %s",
            (model_version, version),
        )
        # online rows computed before this version's data was read are superseded by it (the view
        # already ignores them; this is cleanup). SKIP LOCKED: a row a worker is rewriting right now
        # will be newer than the snapshot, and waiting for it could deadlock the switch with that worker
        conn.execute(
            "DELETE FROM similar_items_online d WHERE (d.model_version, d.listing_id) IN ("
            " SELECT o.model_version, o.listing_id FROM similar_items_online o"
            " JOIN similar_items_versions v ON v.version = %s AND o.model_version = v.model_version"
            " JOIN similar_items s ON s.version = v.version AND s.listing_id = o.listing_id"
            " WHERE o.computed_at <= v.snapshot_at FOR UPDATE OF o SKIP LOCKED)",
            (version,),
        )
    return old


def prune_versions(conn: psycopg.Connection, model_version: str, keep_retired: int = 1) -> list[int]:
    """Delete retired versions beyond the newest `keep_retired` (kept for a quick rollback)."""
    rows = conn.execute(
        "SELECT version, status FROM similar_items_versions WHERE model_version = %s"
        " AND status IN ('retired', 'failed') ORDER BY version DESC",
        (model_version,),
    ).fetchall()
    doomed = [v for v, s in rows if s == "retired"][keep_retired:]
    failed = [v for v, s in rows if s == "failed"]
    with conn.transaction():
        # failed versions keep their row (with the error) as history; their neighbours go
        conn.execute("DELETE FROM similar_items WHERE version = ANY(%s)", (doomed + failed,))
        conn.execute("DELETE FROM similar_items_versions WHERE version = ANY(%s)", (doomed,))
    return doomed


def kept_model_versions(conn: psycopg.Connection, keep: int) -> set[str]:
    """Model versions whose embeddings, online rows and shelves are kept: the last `keep` that were
    active (the active one first), and the model whose shelves serve now, whatever its age."""
    kept = set(fetch_values(
        conn,
        "SELECT model_version FROM models WHERE status = 'active' OR was_active"
        " ORDER BY (status = 'active') DESC, promoted_at DESC NULLS LAST, model_version LIMIT %s", (keep,),
    ))
    shelf = fetch_value(conn, SHELF_MODEL_SQL)
    if shelf is not None:
        kept.add(shelf)
    return kept


def prunable_model_versions(conn: psycopg.Connection, keep: int) -> list[str]:
    """Models that were active, are not kept (`kept_model_versions`) and still hold rows, oldest first.

    Only models that were once active are ever pruned: candidates, shadows and versions the registry does
    not know (ENRICH_MODEL_DIR, hand-run reindexes) keep their rows.
    """
    candidates = fetch_values(
        conn,
        "SELECT m.model_version FROM models m WHERE m.was_active AND m.status <> 'active'"
        " AND (EXISTS (SELECT 1 FROM embeddings e WHERE e.model_version = m.model_version)"
        "   OR EXISTS (SELECT 1 FROM similar_items_versions v WHERE v.model_version = m.model_version)"
        "   OR EXISTS (SELECT 1 FROM similar_items_online o WHERE o.model_version = m.model_version))"
        " ORDER BY m.promoted_at NULLS FIRST, m.model_version",
    )
    kept = kept_model_versions(conn, keep)
    return [m for m in candidates if m not in kept]


def prune_model_version(conn: psycopg.Connection, model_version: str, keep: int) -> bool:
    """Delete one old model's embeddings, online rows and similar-items versions in one transaction.

    The model's registry row is locked and the rule checked again inside it, so a rollback to this
    version that commits first keeps its rows (and one that comes after finds them gone and needs a
    backfill). Returns False when the version turned out to be kept.
    """
    with conn.transaction():
        status = fetch_value(conn, "SELECT status FROM models WHERE model_version = %s FOR UPDATE", (model_version,))
        if status is None or status == "active" or model_version in kept_model_versions(conn, keep):
            return False
        conn.execute("DELETE FROM similar_items_active WHERE model_version = %s", (model_version,))
        # similar_items rows go with their versions (ON DELETE CASCADE)
        conn.execute("DELETE FROM similar_items_versions WHERE model_version = %s", (model_version,))
        conn.execute("DELETE FROM similar_items_online WHERE model_version = %s", (model_version,))
        n = conn.execute("DELETE FROM embeddings WHERE model_version = %s", (model_version,)).rowcount
    log.info("pruned model %s: %d embeddings, its online rows and similar-items versions", model_version, n)
    return True


def active_version(conn: psycopg.Connection, model_version: str) -> int | None:
    """The version readers of the model see; None before its first switch."""
    return fetch_value(conn, "SELECT version FROM similar_items_active WHERE model_version = %s", (model_version,))
