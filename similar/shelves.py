"""Similar items: the nightly whole-catalogue recompute, online neighbours, and live queries.

Where shelves read from
-----------------------
The view `similar_items_current (model_version, listing_id, neighbour_ids, scores, source)`
(migrations/0002) is the one place a "similar items" shelf reads. It shows, per listing:
  * the online row (table `similar_items_online`) when it was computed after the active nightly
    version read its embeddings, or when the listing is not in that version (new since);
  * otherwise the row of the active nightly version (`similar_items_active` → `similar_items`).
`read_neighbours()` reads it and also drops neighbours deleted/sold since they were computed.

Nightly (`recompute`, `enrich reindex`, Celery "enrich.reindex")
---------------------------------------------------------------
read all live embeddings of one model version (binary COPY → numpy) → build a faiss index chosen by
catalogue size → save it as a snapshot (worker/index.py) → search every listing's top-(K+1) in
batches, drop itself → encode rows in numpy and binary-COPY them into a new 'building' version →
switch `similar_items_active` in one transaction → prune old versions and snapshots.
Readers see the old version until the switch and the new one, whole, after it. A crash anywhere
before the switch leaves the active version untouched; the next run marks the leftover 'building'
version failed and deletes its rows. Only one run per model version at a time (advisory lock).
Sharded: `prepare_shards` does the read/build/snapshot and plans id ranges, `compute_shard` (one per
Celery worker) searches one listing-id range against the snapshot, `finish_shards` checks every
listing was written and switches. Shards need the snapshot (ENRICH_INDEX_URI, or a directory all
workers see) and a Celery result backend (the chord). Starting any run abandons a version still
building for that model.

Online (`write_online_neighbours`, called by the enrichment worker after committing embeddings)
----------------------------------------------------------------------------------------------
Top-K for the given listings from (a) the latest snapshot of that model version, searched with the
faiss index, plus (b) an exact search over the "delta": live embeddings created after the snapshot
read them (less `ONLINE_SLACK` for transactions that were still open then). A delta vector replaces
the snapshot's one for the same listing (re-embedded); deleted/sold listings are dropped (the
snapshot may still hold them). Results are upserted into `similar_items_online` with
computed_at = now(). Without a snapshot the delta is the whole catalogue (exact), up to
`ONLINE_EXACT_MAX` embeddings; beyond that online neighbours wait for `enrich reindex`.
The new listing also joins the shelves of its own neighbours where it ranks in their top K (their
current row, nightly or online, merged and upserted as an online row), so fresh inventory shows on
similar-item shelves within seconds, not the next night. Writers of online rows take advisory locks
on the rows' listings (in one order) first, so two workers merging into one shelf don't lose an update.
Each worker process keeps the snapshot memory-mapped (page cache, shared between processes) and
reloads it when the snapshot's LATEST pointer moves. With ENRICH_INDEX_URI set, the nightly job also
publishes each snapshot to S3 and workers on other machines download the newest one
(worker/index_store.py), checking at most every ENRICH_INDEX_SYNC_S.

Attribute-aware ("similar, but by <group>")
-------------------------------------------
Seed 001 (modified CSN): a per-group mask m over the embedding; conditioned similarity is the inner
product of L2-normalise(e ⊙ m). `similar_to(..., mask=...)` takes the mask as an array (the model's
`Predictor.condition_masks()[group]`), so this module never loads the model.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import psycopg

from schemas.taxonomy import CATEGORY_GROUP, TYPE_GROUP
from similar import index as ix
from similar import snapshots as index_store
from similar import store as sdb

log = logging.getLogger(__name__)

ONLINE_SLACK = timedelta(minutes=30)   # longest enrichment transaction we expect to be open
ONLINE_EXACT_MAX = 50_000              # most embeddings the online path searches exactly per batch
ADVISORY_NAMESPACE = "enrich.similar"
SHELF_LOCK_BUCKETS = 4096              # advisory locks on online rows: listing ids hashed into buckets


class ReindexBusy(RuntimeError):
    """Another recompute of the same model version holds the lock."""


@dataclass
class Neighbour:
    listing_id: str
    score: float


@dataclass
class RecomputeResult:
    model_version: str
    version: int | None
    count: int
    k: int
    factory: str
    replaced: int | None = None
    pruned: list[int] = field(default_factory=list)
    snapshot: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        t = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings_s.items())
        return (f"model {self.model_version}: version {self.version} active with top-{self.k} for "
                f"{self.count} listings ({self.factory}); replaced {self.replaced}; pruned {self.pruned or 'none'}; {t}")


# ---------------------------------------------------------------------------------------------
# helpers

def snapshot_root(root: Path | str | None = None) -> Path:
    if root is not None:
        return Path(root)
    from core.config import get_settings

    s = get_settings()
    return s.index_dir or (s.data_dir / "index")


def _publish(path: Path, model_version: str) -> bool:
    """Publish a fresh snapshot where workers on other machines follow it (ENRICH_INDEX_URI), if set."""
    store = index_store.store_from_settings()
    if store is not None:
        store.publish(path, model_version)
    return store is not None


def _prune_snapshots(root: Path | str | None, model_version: str, keep: int) -> None:
    ix.prune_snapshots(snapshot_root(root), model_version, keep)
    store = index_store.store_from_settings()
    if store is not None:
        store.prune(model_version, keep)


def default_k(k: int | None) -> int:
    if k is not None:
        return k
    from core.config import get_settings

    return get_settings().similar_k


def resolve_model_version(conn: psycopg.Connection, model_version: str | None = None) -> str:
    """The given model version, else the active model's, else the one with the most embeddings."""
    if model_version:
        return model_version
    row = conn.execute("SELECT model_version FROM models WHERE status = 'active'").fetchone()
    if row:
        return row[0]
    row = conn.execute(
        "SELECT model_version FROM embeddings GROUP BY model_version ORDER BY count(*) DESC LIMIT 1"
    ).fetchone()
    if row is None:
        raise LookupError("no embeddings in the database: nothing to index")
    return row[0]


def condition(vectors: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Seed 001's conditioned embedding: L2-normalise(e ⊙ m). No mask → the vectors unchanged."""
    if mask is None:
        return vectors
    mask = np.asarray(mask, dtype=np.float32).reshape(-1)
    if vectors.shape[-1] != mask.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} dimensions, embeddings {vectors.shape[-1]}")
    out = vectors * mask
    norms = np.linalg.norm(out, axis=-1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32)


def _decode(ids: np.ndarray) -> list[str]:
    return [i.decode() for i in ids]


def _lock_key(conn: psycopg.Connection, model_version: str) -> int:
    return conn.execute("SELECT hashtextextended(%s, 0)", (f"{ADVISORY_NAMESPACE}:{model_version}",)).fetchone()[0]


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", unit_scale=True, disable=not enabled, leave=False)


# ---------------------------------------------------------------------------------------------
# nightly

def _write_version(conn: psycopg.Connection, version: int, snap_ids: np.ndarray, batches, kk: int,
                   query_pos: np.ndarray, self_pos: np.ndarray, bar=None,
                   after_chunk: Callable[[int], None] | None = None) -> int:
    """Encode search results in numpy and COPY them into `version` (in the caller's transaction).

    `batches` yields (query rows, scores, positions) with `kk` columns (k + 1, or fewer for tiny
    catalogues); the query itself is dropped. `snap_ids` holds the index's ids followed by any query
    ids not in the index; `query_pos[row]` is a query's position in it and `self_pos[row]` its
    position in the index (-2 when absent).
    """
    id_buf, id_off, id_len = sdb.encode_id_fields(snap_ids)
    written = 0

    def chunks():
        nonlocal written
        for rows, scores, pos in batches:
            pos, scores = sdb.drop_self(pos, scores, self_pos[rows], kk - 1)
            pos, scores = sdb.pack_left(pos, scores)
            qpos = query_pos[rows]
            for sl in sdb.iter_id_chunks(len(pos), sdb.ENCODE_CHUNK):
                yield sdb.encode_rows(version, qpos[sl], pos[sl], scores[sl], id_buf, id_off, id_len)
            written += len(pos)
            if bar is not None:
                bar.update(len(pos))
            if after_chunk is not None:
                after_chunk(written)

    sdb.copy_neighbours(conn, sdb.sql.Identifier("similar_items"), chunks())
    return written


def _cleanup_stale(conn: psycopg.Connection, model_version: str) -> None:
    stale = sdb.stale_building(conn, model_version)
    sdb.mark_failed(conn, stale, "abandoned: a later run found it still building (crash or kill)")


def recompute(conn: psycopg.Connection, model_version: str | None = None, *, k: int | None = None,
              factory: str | None = None, nprobe: int | None = None, root: Path | str | None = None,
              keep_versions: int = 1, keep_snapshots: int = 2, progress: bool = False,
              after_chunk: Callable[[int], None] | None = None) -> RecomputeResult:
    """Whole-catalogue top-k in one process; see the module docstring. `conn` must be autocommit."""
    model_version = resolve_model_version(conn, model_version)
    k = default_k(k)
    key = _lock_key(conn, model_version)
    if not conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
        raise ReindexBusy(f"a recompute of model {model_version!r} is already running")
    timings: dict[str, float] = {}
    version = None
    try:
        _cleanup_stale(conn, model_version)
        t0 = time.perf_counter()
        expected, _ = sdb.count_embeddings(conn, model_version)
        with _bar(expected, "read", progress) as bar:
            emb = sdb.read_embeddings(conn, model_version, expected=expected, progress=bar.update)
        timings["read"] = time.perf_counter() - t0
        n = len(emb)
        log.info("read %d embeddings of %s in %.1fs", n, model_version, timings["read"])
        if n == 0:
            raise LookupError(f"no live embeddings for model {model_version!r}")
        spec = ix.choose_spec(n, factory=factory, nprobe=nprobe)

        t0 = time.perf_counter()
        index, assignment = ix.build_index(emb.vectors, spec, keep_assignment=True)
        timings["build"] = time.perf_counter() - t0

        version = sdb.create_version(conn, model_version, k, {"spec": asdict(spec), "count": n}, emb.read_at)
        t0 = time.perf_counter()
        manifest = ix.SnapshotManifest(model_version=model_version, count=n, dim=emb.vectors.shape[1],
                                       spec=asdict(spec), built_at=datetime.now().astimezone().isoformat(),
                                       read_at=emb.read_at, similar_version=version)
        snap_path = ix.save_snapshot(snapshot_root(root), index, emb.ids, manifest)
        timings["snapshot"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if _publish(snap_path, model_version):
            timings["publish"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rows = np.arange(n, dtype=np.int64)
        kk = min(k + 1, n)
        batches = ix.search_all(index, emb.vectors, kk, assignment)
        with _bar(n, "search+write", progress) as bar, conn.transaction():
            written = _write_version(conn, version, emb.ids, batches, kk, rows, rows, bar, after_chunk)
        timings["search_write"] = time.perf_counter() - t0
        del index, assignment

        t0 = time.perf_counter()
        replaced = sdb.switch_active(conn, version)
        timings["switch"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pruned = sdb.prune_versions(conn, model_version, keep_versions)
        _prune_snapshots(root, model_version, keep_snapshots)
        timings["prune"] = time.perf_counter() - t0
        log.info("similar items: version %d of %s active (%d rows)", version, model_version, written)
        return RecomputeResult(model_version, version, n, k, spec.factory, replaced, pruned, str(snap_path), timings)
    except BaseException as exc:
        if version is not None and not conn.closed and not conn.broken:
            try:
                sdb.mark_failed(conn, [version], f"{type(exc).__name__}: {exc}")
            except psycopg.Error:
                log.exception("could not mark version %s failed; the next run will", version)
        raise
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


# --- sharded variant (several Celery workers) ---------------------------------------------------

def shard_bounds(ids: np.ndarray, shards: int) -> list[tuple[str | None, str | None]]:
    """Split sorted ids into `shards` contiguous ranges [lo, hi) of about equal size (None = open end)."""
    n = len(ids)
    shards = max(1, min(shards, n or 1))
    cuts = [_decode(ids[[n * i // shards]])[0] for i in range(1, shards)]
    edges: list[str | None] = [None, *cuts, None]
    return [(edges[i], edges[i + 1]) for i in range(shards)]


def prepare_shards(conn: psycopg.Connection, model_version: str | None, shards: int, *, k: int | None = None,
                   factory: str | None = None, nprobe: int | None = None,
                   root: Path | str | None = None) -> tuple[int, list[tuple[str | None, str | None]]]:
    """Read + build + snapshot once, open a 'building' version, and plan the id ranges."""
    model_version = resolve_model_version(conn, model_version)
    k = default_k(k)
    _cleanup_stale(conn, model_version)
    expected, _ = sdb.count_embeddings(conn, model_version)
    emb = sdb.read_embeddings(conn, model_version, expected=expected)
    if len(emb) == 0:
        raise LookupError(f"no live embeddings for model {model_version!r}")
    spec = ix.choose_spec(len(emb), factory=factory, nprobe=nprobe)
    index, _ = ix.build_index(emb.vectors, spec)
    bounds = shard_bounds(emb.ids, shards)
    version = sdb.create_version(conn, model_version, k, {"spec": asdict(spec), "count": len(emb),
                                                           "shards": bounds}, emb.read_at)
    manifest = ix.SnapshotManifest(model_version=model_version, count=len(emb), dim=emb.vectors.shape[1],
                                   spec=asdict(spec), built_at=datetime.now().astimezone().isoformat(),
                                   read_at=emb.read_at, similar_version=version)
    path = ix.save_snapshot(snapshot_root(root), index, emb.ids, manifest)
    _publish(path, model_version)  # shards on other machines download it by name
    sdb.update_version_params(conn, version, {"snapshot": str(path)})
    return version, bounds


def compute_shard(conn: psycopg.Connection, version: int, lo: str | None, hi: str | None,
                  root: Path | str | None = None) -> int:
    """Top-k for listings in [lo, hi) against the version's snapshot; re-running replaces the range."""
    row = conn.execute("SELECT model_version, k, status, params FROM similar_items_versions WHERE version = %s",
                       (version,)).fetchone()
    if row is None or row[2] != "building":
        raise RuntimeError(f"similar-items version {version} is not building")
    model_version, k, _, params = row
    path = Path(params["snapshot"])
    if not (path / "manifest.json").exists():  # written on another machine: fetch it if it was published
        store = index_store.store_from_settings()
        if store is not None:
            path = store.fetch(snapshot_root(root), model_version, path.name)
    snap = ix.load_snapshot(path, model_version)
    emb = sdb.read_embeddings(conn, model_version, lo, hi)
    # listings embedded after the snapshot get neighbours too; they are appended to the id table
    pos = np.searchsorted(snap.ids, emb.ids)
    pos_c = np.minimum(pos, len(snap.ids) - 1)
    found = snap.ids[pos_c] == emb.ids
    self_pos = np.where(found, pos_c, -2)
    extra = emb.ids[~found]
    all_ids = np.concatenate([snap.ids, extra]) if len(extra) else snap.ids
    query_pos = self_pos.copy()
    query_pos[~found] = len(snap.ids) + np.arange(len(extra))
    with conn.transaction():
        clauses, args = ["version = %s"], [version]
        if lo is not None:
            clauses.append('listing_id COLLATE "C" >= %s')
            args.append(lo)
        if hi is not None:
            clauses.append('listing_id COLLATE "C" < %s')
            args.append(hi)
        conn.execute("DELETE FROM similar_items WHERE " + " AND ".join(clauses), args)
        kk = min(k + 1, snap.index.ntotal)
        batches = ix.search_all(snap.index, emb.vectors, kk)
        written = _write_version(conn, version, all_ids, batches, kk, query_pos, self_pos)
    log.info("shard [%s, %s) of version %d: %d listings", lo, hi, version, written)
    return written


def finish_shards(conn: psycopg.Connection, version: int, keep_versions: int = 1,
                  root: Path | str | None = None, keep_snapshots: int = 2) -> RecomputeResult:
    """Switch to a sharded version once every shard wrote its rows."""
    row = conn.execute("SELECT model_version, k, params FROM similar_items_versions WHERE version = %s",
                       (version,)).fetchone()
    model_version, k, params = row
    written = sdb.version_row_count(conn, version)
    if written < params["count"]:
        sdb.mark_failed(conn, [version], f"only {written} of {params['count']} listings written")
        raise RuntimeError(f"version {version}: only {written} of {params['count']} listings written")
    replaced = sdb.switch_active(conn, version)
    pruned = sdb.prune_versions(conn, model_version, keep_versions)
    _prune_snapshots(root, model_version, keep_snapshots)
    return RecomputeResult(model_version, version, written, k, params["spec"]["factory"], replaced, pruned,
                           params.get("snapshot"))


# ---------------------------------------------------------------------------------------------
# online

_SNAPSHOT_CACHE: dict[str, ix.Snapshot] = {}
_LAST_PULL: dict[str, float] = {}  # model version → time.monotonic() of the last look at the published LATEST
_PULLING: dict[str, threading.Thread] = {}


def _pull(store: index_store.SnapshotStore, root: Path, model_version: str) -> None:
    try:
        store.pull_latest(root, model_version)
    except Exception:  # noqa: BLE001 - best effort: keep answering from the snapshot we have
        log.warning("could not check %s for a newer snapshot of %s; using the local one", store.uri, model_version,
                    exc_info=True)


def _follow_published(root: Path, model_version: str) -> None:
    """Download the published snapshot when it is newer (looking at most every ENRICH_INDEX_SYNC_S).

    In a background thread while a local snapshot exists (a download of a large index must not hold
    up the task that happened to look), in this one when there is none yet (nothing to answer from).
    """
    from core.config import get_settings

    settings, now = get_settings(), time.monotonic()
    if not settings.index_uri or now - _LAST_PULL.get(model_version, -math.inf) < settings.index_sync_s:
        return  # called per batch: decide before making an S3 client
    running = _PULLING.get(model_version)
    if running is not None and running.is_alive():
        return
    _LAST_PULL[model_version] = now
    store = index_store.store_from_settings(settings)
    if ix.latest_snapshot_dir(root, model_version) is None:
        _pull(store, root, model_version)
        return
    _PULLING[model_version] = threading.Thread(target=_pull, args=(store, root, model_version), daemon=True,
                                               name=f"index-pull-{model_version}")
    _PULLING[model_version].start()


def cached_snapshot(model_version: str, root: Path | str | None = None) -> ix.Snapshot | None:
    """The latest snapshot of a model version, loaded once per process and reloaded when LATEST moves
    (locally, or where ENRICH_INDEX_URI publishes it)."""
    root = snapshot_root(root)
    _follow_published(root, model_version)
    path = ix.latest_snapshot_dir(root, model_version)
    if path is None:
        return None
    snap = _SNAPSHOT_CACHE.get(model_version)
    if snap is None or snap.path != path:
        from core import metrics

        snap = ix.load_snapshot(path, model_version, mmap=True)
        _SNAPSHOT_CACHE[model_version] = snap
        metrics.SNAPSHOT_BUILT.labels(model_version=model_version).set(
            datetime.fromisoformat(snap.manifest.built_at).timestamp())
    return snap


def _more_than(conn: psycopg.Connection, model_version: str, n: int) -> bool:
    row = conn.execute("SELECT count(*) FROM (SELECT 1 FROM embeddings WHERE model_version = %s LIMIT %s) t",
                       (model_version, n + 1)).fetchone()
    return row[0] > n


def _live_ids(conn: psycopg.Connection, ids: Sequence[str]) -> set[str]:
    rows = conn.execute("SELECT listing_id FROM listings WHERE listing_id = ANY(%s) AND status <> 'deleted'",
                        (list(ids),)).fetchall()
    return {r[0] for r in rows}


def online_topk(conn: psycopg.Connection, listing_ids: list[str], model_version: str, k: int,
                root: Path | str | None = None) -> dict[str, list[Neighbour]]:
    """Top-k per listing from the latest snapshot plus the exact delta since it (see module docstring)."""
    queries = sdb.read_embeddings(conn, model_version, only_ids=list(listing_ids))
    if len(queries) == 0:
        return {}
    snap = cached_snapshot(model_version, root)
    delta_after = None
    if snap is not None and snap.manifest.read_at:
        delta_after = (datetime.fromisoformat(snap.manifest.read_at) - ONLINE_SLACK).isoformat()
    elif _more_than(conn, model_version, ONLINE_EXACT_MAX):
        # e.g. a freshly promoted model while the backfill re-embeds everything: reading the whole
        # catalogue per batch would stall the enrichment worker; `enrich reindex` fills this in
        log.warning("no similar-items snapshot for %s and > %d embeddings: online neighbours skipped "
                    "until the next reindex", model_version, ONLINE_EXACT_MAX)
        return {}
    candidates: list[list[tuple[str, float]]] = [[] for _ in range(len(queries))]
    delta = sdb.read_embeddings(conn, model_version, created_after=delta_after)
    if len(delta) > ONLINE_EXACT_MAX:
        log.warning("%d embeddings of %s since the last snapshot: is the nightly reindex running?",
                    len(delta), model_version)
    delta_ids = set(_decode(delta.ids))
    over = 2 * k + 1  # room for self, deleted and re-embedded candidates
    if snap is not None and snap.index.ntotal:
        scores, pos = snap.index.search(np.ascontiguousarray(queries.vectors), min(over, snap.index.ntotal))
        for q in range(len(queries)):
            for s, p in zip(scores[q], pos[q]):
                if p >= 0:
                    cid = snap.ids[p].decode()
                    if cid not in delta_ids:  # the delta holds this listing's current vector
                        candidates[q].append((cid, float(s)))
    if len(delta):
        scores, pos = ix.exact_topk(queries.vectors, delta.vectors, over)
        for q in range(len(queries)):
            candidates[q].extend((delta.ids[p].decode(), float(s)) for s, p in zip(scores[q], pos[q]) if p >= 0)
    live = _live_ids(conn, {c for cs in candidates for c, _ in cs})
    out: dict[str, list[Neighbour]] = {}
    for q, qid in enumerate(_decode(queries.ids)):
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


def _lock_shelves(cur: psycopg.Cursor, model_version: str, listing_ids) -> None:
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
    merged = dict(zip(ids, scores))
    new = {n.listing_id: n.score for n in incoming if n.listing_id not in merged}
    top = sorted({**merged, **new}.items(), key=lambda t: (-t[1], t[0]))[:max(k, len(ids))]
    return top if any(c in new for c, _ in top) else None


def write_online_neighbours(conn: psycopg.Connection, listing_ids: list[str], model_version: str,
                            k: int | None = None, *, root: Path | str | None = None) -> int:
    """Compute and upsert top-k neighbours of freshly embedded listings, and rank them into their
    neighbours' shelves; returns the rows written for the fresh listings.

    Listings without an embedding of `model_version`, or deleted, are skipped. Idempotent.
    """
    if not listing_ids:
        return 0
    k = default_k(k)
    found = online_topk(conn, list(listing_ids), model_version, k, root)  # the search: before any lock
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


# ---------------------------------------------------------------------------------------------
# reading and live queries

def read_neighbours(conn: psycopg.Connection, listing_id: str, model_version: str | None = None,
                    k: int | None = None) -> tuple[list[Neighbour], str | None]:
    """What the shelf shows: stored neighbours (online or nightly) minus listings deleted since."""
    model_version = resolve_model_version(conn, model_version)
    rows = conn.execute(
        "SELECT c.source, n.id, n.score FROM similar_items_current c"
        " CROSS JOIN LATERAL unnest(c.neighbour_ids, c.scores) WITH ORDINALITY AS n(id, score, ord)"
        " JOIN listings l ON l.listing_id = n.id AND l.status <> 'deleted'"
        " WHERE c.model_version = %s AND c.listing_id = %s ORDER BY n.ord LIMIT %s",
        (model_version, listing_id, k or 1000),
    ).fetchall()
    source = rows[0][0] if rows else None
    return [Neighbour(r[1], float(r[2])) for r in rows], source


def listing_tag(conn: psycopg.Connection, listing_id: str, group: str) -> str | None:
    row = conn.execute("SELECT value FROM listing_tags WHERE listing_id = %s AND tag_group = %s",
                       (listing_id, group)).fetchone()
    return row[0] if row else None


def similar_to(conn: psycopg.Connection, listing_id: str, model_version: str | None = None, k: int = 20, *,
               mask: np.ndarray | None = None, same_category: bool = False,
               same_type: bool = False) -> list[Neighbour]:
    """Exact top-k of one listing over live listings of its model version, computed now.

    `mask`: seed 001 condition mask of an attribute group ("similar, but by colour") — both sides
    are conditioned as L2-normalise(e ⊙ mask). `same_category` / `same_type` keep only listings
    whose 'category' / 'type' tag equals the query listing's.
    """
    model_version = resolve_model_version(conn, model_version)
    query = sdb.read_embeddings(conn, model_version, only_ids=[listing_id])
    if len(query) == 0:
        raise LookupError(f"listing {listing_id!r} has no live embedding of model {model_version!r}")
    tag_filter = None
    for wanted, group in ((same_category, CATEGORY_GROUP), (same_type, TYPE_GROUP)):
        if wanted:
            value = listing_tag(conn, listing_id, group)
            if value is None:
                raise LookupError(f"listing {listing_id!r} has no {group!r} tag to filter on")
            if tag_filter is not None:
                raise ValueError("filter by one of category or type at a time")
            tag_filter = (group, value)
    cands = sdb.read_embeddings(conn, model_version, tag_filter=tag_filter)
    if len(cands) == 0:
        return []
    q = condition(query.vectors, mask)
    c = condition(cands.vectors, mask)
    scores, pos = ix.exact_topk(q, c, k + 1)
    out = []
    for s, p in zip(scores[0], pos[0]):
        if p < 0:
            continue
        cid = cands.ids[p].decode()
        if cid != listing_id:
            out.append(Neighbour(cid, float(s)))
    return out[:k]
