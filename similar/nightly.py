"""Nightly whole-catalogue recompute of similar items (`enrich reindex`, Celery "enrich.reindex").

One path opens every new version (`_read_build_snapshot`): take the model version's advisory lock
(a concurrent run gets ReindexBusy), mark a version still 'building' from an earlier run failed, read
all live embeddings of the model version (binary COPY → numpy), build a faiss index chosen by
catalogue size, open a new 'building' version, save the index as a snapshot and publish it
(similar/snapshots.py, with ENRICH_INDEX_URI) in a thread of its own. Past
`index.COMPRESSED_MIN` listings the read streams straight into a "grouped" index (k-means on a table
sample first), which is then the only copy of the vectors and is searched list by list.

In one process (`recompute`), with the lock still held: search every listing's top-(K+1) in
batches, drop itself, encode rows in numpy and binary-COPY them into the new version (a writer
thread encodes and copies while the search goes on; the snapshot is saved meanwhile) → switch
`similar_items_active` in one transaction → prune old versions and snapshots.
Sharded (`prepare_shards` → `compute_shard` × N → `finish_shards`): `prepare_shards` opens the
version and plans listing-id ranges (list ranges of a grouped index), then releases the lock; each
`compute_shard` (one per Celery worker) searches one range against the snapshot and records its row
count with its rows; `finish_shards` switches once every planned shard has recorded its rows. Shards
need the snapshot (ENRICH_INDEX_URI, or a directory all workers see) and a Celery result backend.

Which model: the one asked for, else `common.reindex_model_version`: the active model once the
catalogue backfill under it is done (or when it already serves, or nothing else could), otherwise the
model whose shelves serve now, so a half re-embedded catalogue never replaces whole shelves.

Readers see the old version until the switch and the new one, whole, after it. A crash anywhere
before the switch leaves the active version untouched; the next run marks the leftover 'building'
version failed and deletes its rows (so starting any run abandons a version still building for
that model, sharded or not).
"""
from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
from tqdm import tqdm

from core.config import Settings
from core.rows import fetch_row
from similar import index as ix
from similar import pgcopy
from similar import store as sdb
from similar.common import (
    ADVISORY_NAMESPACE,
    bytewise_order,
    decode_ids,
    reindex_model_version,
    snapshot_root,
)
from similar.snapshots import (
    Snapshot,
    SnapshotManifest,
    load_snapshot,
    prune_snapshots,
    safe_name,
    save_snapshot,
    store_from_settings,
)

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

WRITE_QUEUE = 2  # search batches waiting for the writer thread (memory: a few batches of results)
DELETE_BATCH = 16_384  # listing ids per DELETE of an earlier try's rows

# one search batch: (query rows, scores, positions of the neighbours)
SearchBatch = tuple[np.ndarray, np.ndarray, np.ndarray]
# one end of a shard's range [lo, hi): a listing id (None: open) or, for a grouped index, a list number
Bound = str | int | None


class ReindexBusy(RuntimeError):
    """Another recompute of the same model version holds the lock."""


@dataclass
class RecomputeResult:
    model_version: str
    version: int
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
                f"{self.count} listings ({self.factory}); replaced {self.replaced}; "
                f"pruned {self.pruned or 'none'}; {t}")


# ---------------------------------------------------------------------------------------------
# helpers

def _lock_key(conn: psycopg.Connection, model_version: str) -> int:
    (key,) = fetch_row(conn, "SELECT hashtextextended(%s, 0)", (f"{ADVISORY_NAMESPACE}:{model_version}",))
    return int(key)


@contextmanager
def _reindex_lock(conn: psycopg.Connection, model_version: str) -> Iterator[None]:
    """One run per model version at a time: a second would abandon the first one's building version."""
    key = _lock_key(conn, model_version)
    (locked,) = fetch_row(conn, "SELECT pg_try_advisory_lock(%s)", (key,))
    if not locked:
        raise ReindexBusy(f"a recompute of model {model_version!r} is already running")
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def _bar(total: int, desc: str, enabled: bool) -> Any:
    return tqdm(total=total, desc=desc, unit="item", unit_scale=True, disable=not enabled, leave=False)


def _prune_snapshots(settings: Settings, root: Path | str | None, model_version: str, keep: int) -> None:
    prune_snapshots(snapshot_root(settings, root), model_version, keep)
    store = store_from_settings(settings)
    if store is not None:
        store.prune(model_version, keep)


def _mark_failed(conn: psycopg.Connection, version: int, exc: BaseException) -> None:
    if conn.closed or conn.broken:
        return  # the next run marks it failed
    try:
        sdb.mark_failed(conn, [version], f"{type(exc).__name__}: {exc}")
    except psycopg.Error:
        log.exception("could not mark version %s failed; the next run will", version)


class _SearchFailed(Exception):
    """Tells the writer thread that the search stopped early: roll the COPY back."""


def _write_version(conn: psycopg.Connection, version: int, snap_ids: np.ndarray, batches: Iterable[SearchBatch],
                   kk: int, query_pos: np.ndarray, self_pos: np.ndarray, bar: Any = None,
                   after_chunk: Callable[[int], None] | None = None) -> int:
    """Encode search results in numpy and COPY them into `version` (in the caller's transaction).

    `batches` yields (query rows, scores, positions) with `kk` columns (k + 1, or fewer for tiny
    catalogues); the query itself is dropped. `snap_ids` holds the index's ids followed by any query
    ids not in the index; `query_pos[row]` is a query's position in it and `self_pos[row]` its
    position in the index (-2 when absent).

    The COPY runs in a writer thread, the only user of `conn` until this returns, while this thread
    goes on searching: faiss and numpy release the GIL and Postgres inserts in its own process, so
    the search never waits for the database. A bounded queue holds at most WRITE_QUEUE batches. An
    error on either side rolls the COPY back and is raised here once the writer has stopped.
    """
    ids = pgcopy.encode_id_fields(snap_ids)
    todo: queue.Queue[SearchBatch | None] = queue.Queue(maxsize=WRITE_QUEUE)
    search_failed = threading.Event()
    write_failed: list[BaseException] = []
    written = 0

    def chunks() -> Iterator[bytes]:
        nonlocal written
        while (item := todo.get()) is not None:
            if search_failed.is_set():
                raise _SearchFailed()
            rows, scores, pos = item
            pos, scores = ix.drop_self(pos, scores, self_pos[rows], kk - 1)
            pos, scores = ix.pack_left(pos, scores)
            qpos = query_pos[rows]
            for s in range(0, len(pos), pgcopy.ENCODE_CHUNK):
                sl = slice(s, s + pgcopy.ENCODE_CHUNK)
                yield pgcopy.encode_neighbour_rows(version, qpos[sl], pos[sl], scores[sl], ids)
            written += len(pos)
            if bar is not None:
                bar.update(len(pos))
            if after_chunk is not None:
                after_chunk(written)
        if search_failed.is_set():
            raise _SearchFailed()

    def write() -> None:
        try:
            pgcopy.copy_neighbours_in(conn, "similar_items", chunks())
        except BaseException as exc:
            write_failed.append(exc)

    def hand_over(item: SearchBatch | None) -> None:
        while True:
            if write_failed:
                raise write_failed[0]
            try:
                todo.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    writer = threading.Thread(target=write, name="similar-items-writer", daemon=True)
    writer.start()
    try:
        for item in batches:
            hand_over(item)
        hand_over(None)
    except BaseException:
        search_failed.set()
        try:
            todo.put_nowait(None)  # wake a writer waiting for the next batch
        except queue.Full:
            pass  # it is busy and checks the flag at its next batch
        writer.join()
        raise
    writer.join()
    if write_failed:
        raise write_failed[0]
    return written


# ---------------------------------------------------------------------------------------------
# the shared start of every run: read → build → snapshot

class _SnapshotSaver:
    """Saves (and with ENRICH_INDEX_URI publishes) a snapshot in a thread: the disk write and the
    upload overlap the search, which only reads the same index."""

    def __init__(self, settings: Settings, root: Path | str | None, index: faiss.Index, ids: np.ndarray,
                 manifest: SnapshotManifest, timings: dict[str, float]) -> None:
        self.path: Path | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._save, args=(settings, root, index, ids, manifest, timings),
                                        name="similar-snapshot", daemon=True)
        self._thread.start()

    def _save(self, settings: Settings, root: Path | str | None, index: faiss.Index, ids: np.ndarray,
              manifest: SnapshotManifest, timings: dict[str, float]) -> None:
        try:
            t0 = time.perf_counter()
            path = save_snapshot(snapshot_root(settings, root), index, ids, manifest)
            timings["snapshot"] = time.perf_counter() - t0
            store = store_from_settings(settings)
            if store is not None:  # workers (and shards) on other machines download it by name
                t0 = time.perf_counter()
                store.publish(path, manifest.model_version)
                timings["publish"] = time.perf_counter() - t0
            self.path = path
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        """Wait for the thread without raising its error."""
        self._thread.join()

    def wait(self) -> Path:
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.path is not None
        return self.path


@dataclass
class _Built:
    model_version: str
    k: int
    version: int
    emb: sdb.Embeddings
    spec: ix.IndexSpec
    index: faiss.Index | None  # None once taken (`take_index`)
    assignment: tuple[np.ndarray, np.ndarray] | None
    saver: _SnapshotSaver
    timings_s: dict[str, float]
    snapshot: Path | None = None

    def take_index(self) -> tuple[faiss.Index, tuple[np.ndarray, np.ndarray] | None]:
        """The index and its IVF assignment, no longer held here: once the caller drops them their
        memory goes (the snapshot on disk keeps the index)."""
        if self.index is None:
            raise RuntimeError("the index was taken already")
        index, assignment = self.index, self.assignment
        self.index = self.assignment = None
        return index, assignment

    def finish_snapshot(self, conn: psycopg.Connection) -> Path:
        """Wait for the snapshot and record it on the version (`conn` must be free: no COPY running)."""
        if self.snapshot is None:
            t0 = time.perf_counter()
            path = self.saver.wait()
            self.timings_s["snapshot_wait"] = time.perf_counter() - t0
            sdb.update_version_params(conn, self.version, {"snapshot": str(path)})
            self.snapshot = path
        return self.snapshot


def _read_grouped(conn: psycopg.Connection, model_version: str, spec: ix.IndexSpec, expected: int,
                  timings: dict[str, float], progress: bool) -> tuple[sdb.Embeddings, faiss.Index, None]:
    """A grouped index: k-means on a sample, then the vectors stream from the read into the lists
    ("read" includes adding them; "build" the sample, the centroids and the renumbering)."""
    t0 = time.perf_counter()
    builder = ix.GroupedBuilder(sdb.sample_embeddings(conn, model_version, ix.sample_size(spec), expected), spec)
    timings["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with _bar(expected, "read", progress) as bar:
        emb = sdb.read_embeddings(conn, model_version, progress=bar.update, sink=builder.add)
    timings["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    order = bytewise_order(emb.ids)
    builder.finish(emb.ids, order)
    emb.ids = emb.ids[order]
    timings["build"] += time.perf_counter() - t0
    return emb, builder.index, None


@contextmanager
def _read_build_snapshot(conn: psycopg.Connection, settings: Settings, model_version: str | None, *,
                         k: int | None, factory: str | None, nprobe: int | None, root: Path | str | None,
                         keep_assignment: bool = False, progress: bool = False,
                         grouped: bool | None = None) -> Iterator[_Built]:
    """Open a new 'building' version and save (and publish) its snapshot in a thread; see the module
    docstring. `built.finish_snapshot(conn)` waits for the snapshot and records it on the version;
    the block must call it before anything needs the snapshot (leaving the block calls it too).

    The model version's lock is held until the `with` block ends. An error inside the block (or
    while saving the snapshot) marks the version failed; the active version stays as it was.
    """
    model_version = reindex_model_version(conn, model_version)
    k = settings.similar_k if k is None else k
    with _reindex_lock(conn, model_version):
        sdb.mark_failed(conn, sdb.stale_building(conn, model_version),
                        "abandoned: a later run found it still building (crash or kill)")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        expected, _ = sdb.count_embeddings(conn, model_version)
        # chosen before the read: a big catalogue streams into its index, never held twice
        spec = ix.choose_spec(expected, factory=factory, nprobe=nprobe, grouped=grouped)
        if spec.grouped and expected:
            emb, index, assignment = _read_grouped(conn, model_version, spec, expected, timings, progress)
        else:
            with _bar(expected, "read", progress) as bar:
                emb = sdb.read_embeddings(conn, model_version, expected=expected, progress=bar.update)
            timings["read"] = time.perf_counter() - t0
        n = len(emb)
        log.info("read %d embeddings of %s in %.1fs", n, model_version, timings["read"])
        if n == 0:
            raise LookupError(f"no live embeddings for model {model_version!r}")
        if not spec.grouped:
            t0 = time.perf_counter()
            index, assignment = ix.build_index(emb.vectors, spec, keep_assignment=keep_assignment)
            timings["build"] = time.perf_counter() - t0

        version = sdb.create_version(conn, model_version, k, {"spec": asdict(spec), "count": n}, emb.read_at)
        saver = None
        try:
            manifest = SnapshotManifest(model_version=model_version, count=n, dim=index.d,
                                        spec=asdict(spec), built_at=datetime.now().astimezone().isoformat(),
                                        read_at=emb.read_at, similar_version=version,
                                        read_snapshot=emb.read_snapshot)
            saver = _SnapshotSaver(settings, root, index, emb.ids, manifest, timings)
            built = _Built(model_version, k, version, emb, spec, index, assignment, saver, timings)
            del emb, index, assignment  # the caller may drop the index (and its memory) early
            yield built
            built.finish_snapshot(conn)
        except BaseException as exc:
            if saver is not None:
                saver.join()  # never leave it writing after the version failed
            _mark_failed(conn, version, exc)
            raise


# ---------------------------------------------------------------------------------------------
# one process

def recompute(conn: psycopg.Connection, model_version: str | None = None, *, settings: Settings,
              k: int | None = None, factory: str | None = None, nprobe: int | None = None,
              root: Path | str | None = None, keep_versions: int = 1, keep_snapshots: int = 2,
              progress: bool = False, after_chunk: Callable[[int], None] | None = None,
              grouped: bool | None = None) -> RecomputeResult:
    """Whole-catalogue top-k in one process; see the module docstring. `conn` must be autocommit.
    `grouped` forces (or rules out) the big-catalogue index (`similar.index.IndexSpec.grouped`)."""
    with _read_build_snapshot(conn, settings, model_version, k=k, factory=factory, nprobe=nprobe, root=root,
                              grouped=grouped,
                              keep_assignment=True, progress=progress) as built:
        model_version, version, n, timings = built.model_version, built.version, len(built.emb), built.timings_s
        t0 = time.perf_counter()
        rows = np.arange(n, dtype=np.int64)
        kk = min(built.k + 1, n)
        index, assignment = built.take_index()
        if built.spec.grouped:
            batches = ix.search_grouped(index, kk)
        else:
            batches = ix.search_all(index, built.emb.vectors, kk, assignment)
        with _bar(n, "search+write", progress) as bar, conn.transaction():
            written = _write_version(conn, version, built.emb.ids, batches, kk, rows, rows, bar, after_chunk)
        timings["search_write"] = time.perf_counter() - t0
        del index, assignment, batches  # free them before the switch and prune
        built.finish_snapshot(conn)  # saved while the search ran; workers need it before the switch

        t0 = time.perf_counter()
        replaced = sdb.switch_active(conn, version)
        timings["switch"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pruned = sdb.prune_versions(conn, model_version, keep_versions)
        _prune_snapshots(settings, root, model_version, keep_snapshots)
        timings["prune"] = time.perf_counter() - t0
        log.info("similar items: version %d of %s active (%d rows)", version, model_version, written)
        return RecomputeResult(model_version, version, n, built.k, built.spec.factory, replaced, pruned,
                               str(built.snapshot), timings)


# ---------------------------------------------------------------------------------------------
# sharded (several Celery workers)

def shard_bounds(ids: np.ndarray, shards: int) -> list[tuple[str | None, str | None]]:
    """Split sorted ids into `shards` contiguous ranges [lo, hi) of about equal size (None = open end)."""
    n = len(ids)
    shards = max(1, min(shards, n or 1))
    cuts = [decode_ids(ids[[n * i // shards]])[0] for i in range(1, shards)]
    edges: list[str | None] = [None, *cuts, None]
    return [(edges[i], edges[i + 1]) for i in range(shards)]


def list_bounds(nlist: int, shards: int) -> list[tuple[int, int]]:
    """Split a grouped index's lists into `shards` contiguous ranges [lo, hi) of about equal count."""
    shards = max(1, min(shards, nlist))
    cuts = [nlist * i // shards for i in range(shards + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(shards)]


def prepare_shards(conn: psycopg.Connection, model_version: str | None, shards: int, *, settings: Settings,
                   k: int | None = None, factory: str | None = None, nprobe: int | None = None,
                   root: Path | str | None = None,
                   grouped: bool | None = None) -> tuple[int, Sequence[tuple[Bound, Bound]]]:
    """Open a 'building' version (read + build + snapshot once) and plan its shards: listing-id ranges, or
    for a grouped index ranges of its lists (each searched list by list, as in one process)."""
    with _read_build_snapshot(conn, settings, model_version, k=k, factory=factory, nprobe=nprobe,
                              root=root, grouped=grouped) as built:
        built.finish_snapshot(conn)  # the shards search it
        index, _ = built.take_index()
        nlist = ix.ivf_nlist(index) if built.spec.grouped else None  # a grouped index is an IVF-Flat
        bounds: Sequence[tuple[Bound, Bound]] = (list_bounds(nlist, shards) if nlist is not None
                                                 else shard_bounds(built.emb.ids, shards))
        sdb.update_version_params(conn, built.version, {"shards": bounds})
        return built.version, bounds


def compute_shard(conn: psycopg.Connection, version: int, lo: Bound, hi: Bound, root: Path | str | None = None, *,
                  settings: Settings) -> int:
    """Top-k for listings in [lo, hi) against the version's snapshot (for a grouped index: the members of
    lists [lo, hi)); re-running replaces the range."""
    info = sdb.version_info(conn, version)
    if info is None or info.status != "building":
        raise RuntimeError(f"similar-items version {version} is not building")
    model_version, k, params = info.model_version, info.k, info.params
    planned = [tuple(b) for b in params.get("shards", [])]
    if (lo, hi) not in planned:
        raise ValueError(f"[{lo}, {hi}) is not one of version {version}'s shards {planned}")
    path = Path(params["snapshot"])
    if not (path / "manifest.json").exists():  # written on another machine: fetch it if it was published
        store = store_from_settings(settings)
        if store is not None:
            path = store.fetch(snapshot_root(settings, root), model_version, path.name)
    snap = load_snapshot(path, model_version)
    if params["spec"].get("grouped"):
        if not (isinstance(lo, int) and isinstance(hi, int)):
            raise ValueError(f"a grouped index's shards are ranges of its lists, not [{lo!r}, {hi!r})")
        written = _compute_list_shard(conn, version, snap, k, range(lo, hi), planned.index((lo, hi)))
        log.info("lists [%s, %s) of version %d: %d listings", lo, hi, version, written)
        return written
    if isinstance(lo, int) or isinstance(hi, int):
        raise ValueError(f"shards are ranges of listing ids, not [{lo!r}, {hi!r})")
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
    import faiss  # lazy: the CLI starts without faiss

    # queries in order of their nearest IVF list, as in one process: consecutive ones probe the same lists
    ivf = faiss.downcast_index(snap.index)
    assignment = ix.assign_lists(ivf, emb.vectors, ivf.nprobe) if isinstance(ivf, faiss.IndexIVF) else None
    with conn.transaction():
        clauses: list[str] = ["version = %s"]
        args: list[object] = [version]
        if lo is not None:
            clauses.append('listing_id COLLATE "C" >= %s')
            args.append(lo)
        if hi is not None:
            clauses.append('listing_id COLLATE "C" < %s')
            args.append(hi)
        conn.execute("DELETE FROM similar_items WHERE " + " AND ".join(clauses), args)
        kk = min(k + 1, snap.index.ntotal)
        batches = ix.search_all(snap.index, emb.vectors, kk, assignment)
        written = _write_version(conn, version, all_ids, batches, kk, query_pos, self_pos)
        _record_shard(conn, version, planned.index((lo, hi)), written)
    log.info("shard [%s, %s) of version %d: %d listings", lo, hi, version, written)
    return written


def _record_shard(conn: psycopg.Connection, version: int, shard: int, written: int) -> None:
    """Recorded with the rows (one commit): finish_shards switches only once every shard has its entry.
    A version failed meanwhile takes no rows: they would outlive its cleanup."""
    done = conn.execute(
        "UPDATE similar_items_versions SET params = jsonb_set(params, '{written}',"
        " coalesce(params->'written', '{}') || jsonb_build_object(%s::text, %s::bigint))"
        " WHERE version = %s AND status = 'building'", (str(shard), written, version))
    if done.rowcount != 1:
        raise RuntimeError(f"similar-items version {version} stopped building while shard {shard} ran")


def _compute_list_shard(conn: psycopg.Connection, version: int, snap: Snapshot, k: int, lists: range,
                        shard: int) -> int:
    """The members of `lists` of a grouped snapshot, searched list by list. Listings embedded after the
    snapshot are in no list: the online path gives them neighbours until the next night."""
    members = [ix.list_ids(snap.index, lst) for lst in lists]
    mine = decode_ids(snap.ids[np.concatenate(members)]) if members else []
    rows = np.arange(len(snap.ids), dtype=np.int64)
    kk = min(k + 1, snap.index.ntotal)
    with conn.transaction():
        for s in range(0, len(mine), DELETE_BATCH):  # a rerun replaces what an earlier try wrote
            conn.execute("DELETE FROM similar_items WHERE version = %s AND listing_id = ANY(%s)",
                         (version, mine[s:s + DELETE_BATCH]))
        batches = ix.search_grouped(snap.index, kk, lists=lists)
        written = _write_version(conn, version, snap.ids, batches, kk, rows, rows)
        _record_shard(conn, version, shard, written)
    return written


def finish_shards(conn: psycopg.Connection, version: int, keep_versions: int = 1,
                  root: Path | str | None = None, keep_snapshots: int = 2, *, settings: Settings) -> RecomputeResult:
    """Switch to a sharded version once every shard wrote its rows (each records its count with them)."""
    info = sdb.version_info(conn, version)
    if info is None:
        raise LookupError(f"no similar-items version {version}")
    model_version, k, params = info.model_version, info.k, info.params
    shards, done = params.get("shards") or [], params.get("written", {})
    missing = [i for i in range(len(shards)) if str(i) not in done]
    written = sdb.version_row_count(conn, version)
    # listings added or removed since the snapshot move the total away from params["count"]; the shards'
    # own counts do not: every one reported, and the rows are exactly theirs
    if not shards or missing or written != sum(done.values()):
        reason = ("no shards were planned" if not shards else
                  f"only {len(done)} of {len(shards)} shards wrote their rows (not {missing})" if missing else
                  f"{written} rows but the shards reported {sum(done.values())}")
        sdb.mark_failed(conn, [version], reason)
        raise RuntimeError(f"similar-items version {version} not switched: {reason}")
    replaced = sdb.switch_active(conn, version)
    pruned = sdb.prune_versions(conn, model_version, keep_versions)
    _prune_snapshots(settings, root, model_version, keep_snapshots)
    return RecomputeResult(model_version, version, written, k, params["spec"]["factory"], replaced, pruned,
                           params.get("snapshot"))


# ---------------------------------------------------------------------------------------------
# old model versions

def prune_models(conn: psycopg.Connection, *, settings: Settings, keep: int | None = None,
                 root: Path | str | None = None) -> list[str]:
    """Delete what models beyond the last `keep` (ENRICH_KEEP_MODEL_VERSIONS) that were active still hold:
    embeddings, online rows, similar-items versions and local snapshots (`store.prunable_model_versions`).

    Never the active model, nor the one whose shelves serve now. A version being reindexed right now is
    left for the next call. `conn` must be autocommit. Returns the pruned versions.
    """
    keep = settings.keep_model_versions if keep is None else keep
    pruned = []
    for model_version in sdb.prunable_model_versions(conn, keep):
        try:
            with _reindex_lock(conn, model_version):
                if not sdb.prune_model_version(conn, model_version, keep):
                    continue
        except ReindexBusy:
            log.info("model %s is being reindexed; pruning it later", model_version)
            continue
        pruned.append(model_version)
        shutil.rmtree(snapshot_root(settings, root) / safe_name(model_version), ignore_errors=True)
        store = store_from_settings(settings)
        if store is not None:  # published snapshots too (the one LATEST names stays, as store.prune does)
            store.prune(model_version, 0)
    if pruned:
        log.info("pruned model versions %s (keeping the last %d that were active)", pruned, keep)
    return pruned
