"""Online neighbours: fresh listings get similar items within seconds, not the next night.

`write_online_neighbours` is called by the enrichment worker after committing embeddings. Top-K for
the given listings comes from (a) the latest snapshot of that model version, searched with the
faiss index, plus (b) a search over the "delta": the embeddings written since that snapshot, held in
this process and topped up per task with only the rows written since its last look, searched exactly
beside an exact snapshot and in the snapshot's own IVF lists beside an IVF one (similar/delta.py), so a
task's cost does not grow with the listings since the snapshot. A delta
vector replaces the snapshot's one for the same listing (re-embedded); deleted/sold listings are
dropped (the snapshot may still hold them). Results are upserted into `similar_items_online` with
computed_at = now(). Without a snapshot the delta is the whole catalogue (exact), up to
ENRICH_ONLINE_DELTA_MAX embeddings; beyond that online neighbours wait for `enrich reindex`.

The new listing also joins the shelves of its own neighbours where it ranks in their top K (their
current row, nightly or online, merged and upserted as an online row). Writers of online rows take
advisory locks on the rows' listings (in one order) first, so two workers merging into one shelf
don't lose an update.

Each worker process keeps the snapshot memory-mapped (page cache, shared between processes) and
reloads it when the snapshot's LATEST pointer moves. With ENRICH_INDEX_URI set, the nightly job also
publishes each snapshot to S3 and workers on other machines download the newest one
(similar/snapshots.py), checking at most every ENRICH_INDEX_SYNC_S.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Collection, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import psycopg

from core import metrics
from core.config import Settings
from core.rows import fetch_row, fetch_values
from similar import delta as dl
from similar import store as sdb
from similar.common import ADVISORY_NAMESPACE, Neighbour, decode_ids, snapshot_root
from similar.snapshots import Snapshot, SnapshotStore, latest_snapshot_dir, load_snapshot, store_from_settings

log = logging.getLogger(__name__)

SHELF_LOCK_BUCKETS = 4096              # advisory locks on online rows: listing ids hashed into buckets


# ---------------------------------------------------------------------------------------------
# the snapshot this process searches

_SNAPSHOT_CACHE: dict[str, Snapshot] = {}
_LAST_PULL: dict[str, float] = {}  # model version → time.monotonic() of the last look at the published LATEST
_PULLING: dict[str, threading.Thread] = {}


def _pull(store: SnapshotStore, root: Path, model_version: str) -> None:
    try:
        store.pull_latest(root, model_version)
    except Exception:
        log.warning("could not check %s for a newer snapshot of %s; using the local one", store.uri, model_version,
                    exc_info=True)


def _follow_published(settings: Settings, root: Path, model_version: str) -> None:
    """Download the published snapshot when it is newer (looking at most every ENRICH_INDEX_SYNC_S).

    In a background thread while a local snapshot exists (a download of a large index must not hold
    up the task that happened to look), in this one when there is none yet (nothing to answer from).
    """
    now = time.monotonic()
    if not settings.index_uri or now - _LAST_PULL.get(model_version, -math.inf) < settings.index_sync_s:
        return  # called per batch: decide before making an S3 client
    running = _PULLING.get(model_version)
    if running is not None and running.is_alive():
        return
    _LAST_PULL[model_version] = now
    store = store_from_settings(settings)
    if store is None:
        return
    if latest_snapshot_dir(root, model_version) is None:
        _pull(store, root, model_version)
        return
    _PULLING[model_version] = threading.Thread(target=_pull, args=(store, root, model_version), daemon=True,
                                               name=f"index-pull-{model_version}")
    _PULLING[model_version].start()


def cached_snapshot(model_version: str, root: Path | str | None = None, *,
                    settings: Settings) -> Snapshot | None:
    """The latest snapshot of a model version, loaded once per process and reloaded when LATEST moves
    (locally, or where ENRICH_INDEX_URI publishes it)."""
    root = snapshot_root(settings, root)
    _follow_published(settings, root, model_version)
    path = latest_snapshot_dir(root, model_version)
    if path is None:
        return None
    snap = _SNAPSHOT_CACHE.get(model_version)
    if snap is None or snap.path != path:
        snap = load_snapshot(path, model_version, mmap=True)
        _SNAPSHOT_CACHE[model_version] = snap
        metrics.SNAPSHOT_BUILT.labels(model_version=model_version).set(
            datetime.fromisoformat(snap.manifest.built_at).timestamp())
    return snap


# ---------------------------------------------------------------------------------------------
# search

def _live_ids(conn: psycopg.Connection, ids: Collection[str]) -> set[str]:
    return set(fetch_values(conn, "SELECT listing_id FROM listings WHERE listing_id = ANY(%s)"
                                  " AND status <> 'deleted'", (list(ids),)))


def _too_many_without_snapshot(conn: psycopg.Connection, model_version: str, settings: Settings) -> bool:
    held = dl.held(model_version)
    if held is not None:
        return held > settings.online_delta_max
    (count,) = fetch_row(conn, "SELECT count(*) FROM (SELECT 1 FROM embeddings WHERE model_version = %s LIMIT %s) t",
                         (model_version, settings.online_delta_max + 1))
    return bool(count > settings.online_delta_max)


def online_topk(conn: psycopg.Connection, listing_ids: list[str], model_version: str, k: int,
                root: Path | str | None = None, *, settings: Settings) -> dict[str, list[Neighbour]]:
    """Top-k per listing from the latest snapshot plus the delta since it (see module docstring)."""
    queries = sdb.read_embeddings(conn, model_version, only_ids=list(listing_ids))
    if len(queries) == 0:
        return {}
    snap = cached_snapshot(model_version, root, settings=settings)
    if snap is None and _too_many_without_snapshot(conn, model_version, settings):
        # e.g. a freshly promoted model while the backfill re-embeds everything: holding the whole catalogue
        # in every worker would cost too much memory; `enrich reindex` fills this in
        log.warning("no similar-items snapshot for %s and > %d embeddings: online neighbours skipped "
                    "until the next reindex", model_version, settings.online_delta_max)
        dl.forget(model_version)
        return {}
    candidates: list[list[tuple[str, float]]] = [[] for _ in range(len(queries))]
    over = 2 * k + 1  # room for self, deleted and re-embedded candidates
    if snap is not None and snap.index.ntotal:
        scores, pos = snap.index.search(np.ascontiguousarray(queries.vectors), min(over, snap.index.ntotal))
    with dl.LOCK:
        delta = dl.current_delta(conn, model_version, snap, settings=settings)
        if snap is not None and snap.index.ntotal:
            for q in range(len(queries)):
                for s, p in zip(scores[q], pos[q], strict=True):
                    # the delta holds the current vector of a listing re-embedded since the snapshot
                    if p >= 0 and snap.ids[p] not in delta.pos:
                        candidates[q].append((snap.ids[p].decode(), float(s)))
        for q, found in enumerate(delta.search(queries.vectors, over)):
            candidates[q].extend(found)
    live = _live_ids(conn, {c for cs in candidates for c, _ in cs})
    out: dict[str, list[Neighbour]] = {}
    for q, qid in enumerate(decode_ids(queries.ids)):
        seen, best = {qid}, []
        for cid, s in sorted(candidates[q], key=lambda t: -t[1]):
            if cid in seen or cid not in live:
                continue
            seen.add(cid)
            best.append(Neighbour(cid, s))
            if len(best) == k:
                break
        out[qid] = best
    return out


# ---------------------------------------------------------------------------------------------
# writing rows and merging shelves

def _lock_shelves(cur: psycopg.Cursor, model_version: str, listing_ids: Collection[str]) -> None:
    """Serialise read-merge-writes of these listings' online rows across workers (until commit);
    buckets are taken in one order, so two writers never wait on each other in a cycle."""
    cur.execute(
        "SELECT pg_advisory_xact_lock(hashtext(%s), b) FROM"
        " (SELECT DISTINCT hashtext(x) & %s AS b FROM unnest(%s::text[]) x ORDER BY b) buckets",
        (f"{ADVISORY_NAMESPACE}.shelf:{model_version}", SHELF_LOCK_BUCKETS - 1, sorted(set(listing_ids))),
    )


def incoming_neighbours(found: dict[str, list[Neighbour]]) -> dict[str, list[Neighbour]]:
    """Neighbour → the fresh listings that found it: candidates for that neighbour's own shelf
    (similarity is symmetric). Fresh listings' own rows are already complete."""
    incoming: dict[str, list[Neighbour]] = {}
    for lid, neighbours in found.items():
        for n in neighbours:
            if n.listing_id not in found:
                incoming.setdefault(n.listing_id, []).append(Neighbour(lid, n.score))
    return incoming


def merge_shelf(ids: Sequence[str], scores: Sequence[float], incoming: list[Neighbour], k: int
                ) -> list[tuple[str, float]] | None:
    """A shelf with the incoming listings ranked in, at most max(k, its length) long; None when no
    new one ranks high enough (those already on the shelf stay as they are: replays write nothing)."""
    merged = dict(zip(ids, scores, strict=True))
    new = {n.listing_id: n.score for n in incoming if n.listing_id not in merged}
    top = sorted({**merged, **new}.items(), key=lambda t: (-t[1], t[0]))[:max(k, len(ids))]
    return top if any(c in new for c, _ in top) else None


def write_online_neighbours(conn: psycopg.Connection, listing_ids: list[str], model_version: str,
                            k: int | None = None, *, settings: Settings, root: Path | str | None = None) -> int:
    """Compute and upsert top-k neighbours of freshly embedded listings, and rank them into their
    neighbours' shelves; returns the rows written for the fresh listings.

    Listings without an embedding of `model_version`, or deleted, are skipped. Idempotent.
    `k` defaults to ENRICH_SIMILAR_K, `root` to the snapshot directory of `settings`.
    """
    if not listing_ids:
        return 0
    k = settings.similar_k if k is None else k
    found = online_topk(conn, list(listing_ids), model_version, k, root, settings=settings)  # before any lock
    if not found:
        return 0
    incoming = incoming_neighbours(found)
    upsert = ("INSERT INTO similar_items_online (model_version, listing_id, neighbour_ids, scores)"
              " VALUES (%s, %s, %s, %s::real[]) ON CONFLICT (model_version, listing_id) DO UPDATE"
              " SET neighbour_ids = EXCLUDED.neighbour_ids, scores = EXCLUDED.scores, computed_at = now()")
    rows = [(model_version, lid, [n.listing_id for n in ns], [n.score for n in ns]) for lid, ns in found.items()]
    with conn.transaction(), conn.cursor() as cur:
        _lock_shelves(cur, model_version, [*found, *incoming])
        cur.executemany(upsert, rows)
        joined = []
        if incoming:  # their shelves as readers see them now (nightly or online), read under the locks
            for lid, ids, scores in cur.execute(
                    "SELECT listing_id, neighbour_ids, scores FROM similar_items_current"
                    " WHERE model_version = %s AND listing_id = ANY(%s)", (model_version, list(incoming))).fetchall():
                top = merge_shelf(ids, scores, incoming[lid], k)
                if top is not None:
                    joined.append((model_version, lid, [c for c, _ in top], [s for _, s in top]))
            if joined:
                cur.executemany(upsert, joined)
    log.info("online neighbours written for %d listing(s) of %s; they joined %d other shelves",
             len(rows), model_version, len(joined))
    return len(rows)
