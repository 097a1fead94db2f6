"""The online delta: the embeddings of one model version that its latest similar-items snapshot lacks, held
in this process and topped up per task with only what was written since the last look.

Which rows are new is decided by transaction visibility, not by time: every embedding row carries the id of
the transaction that wrote it (`written_xid`, migrations/0008), every read records its pg_snapshot, and the
next read asks for the rows that snapshot did not see. A transaction that commits late (its rows stamped
before the last read) is still found, and a row is read once per process, plus once more each time it is
rewritten (a re-embedded listing: its new vector replaces the held one).

When the snapshot moves (the nightly job published a newer one) the delta is read afresh: what that
snapshot did not see, a few minutes' worth of listings, once per snapshot. A snapshot written before
migrations/0008 has no pg_snapshot in its manifest: its delta starts at its read time less `ONLINE_SLACK`.
Without a snapshot the delta is the whole catalogue of the version, up to ENRICH_ONLINE_DELTA_MAX.

Search: exact beside an exact (Flat) snapshot; beside an IVF snapshot the delta goes into lists on that
snapshot's coarse quantizer and is probed like it, at a cost that does not grow with the delta (`Delta`).

Memory: 4·dim bytes per listing written since the snapshot (1 KiB at 256 dimensions) in each worker
process, plus its id. A worker asks for a reindex (once per delta) when its delta passes
ENRICH_ONLINE_DELTA_MAX listings, or `similar.index.FLAT_MAX` while searched exactly (the reindex then
builds an IVF snapshot); the search goes on meanwhile, and the new snapshot starts a new, small delta.
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np
import psycopg

from core import metrics
from core.celery_app import REINDEX_TASK, app
from core.config import Settings
from similar import index as ix
from similar import store as sdb
from similar.snapshots import Snapshot

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

ONLINE_SLACK = timedelta(minutes=30)  # longest enrichment transaction we expect to be open (old snapshots only)


class Delta:
    """Listings of one model version written after `snapshot` (None: all of them) and their vectors.

    Searched exactly while the snapshot is exact (Flat, small catalogues); beside an IVF snapshot the delta's
    vectors go into that snapshot's lists (its trained coarse quantizer, its nprobe), so a search probes a
    few lists instead of scanning every vector and costs the same whatever the delta's size, with the
    snapshot's own recall.
    """

    def __init__(self, model_version: str, snapshot: Snapshot | None) -> None:
        self.model_version = model_version
        self.snapshot_path = snapshot.path if snapshot is not None else None
        self.ids: list[bytes] = []          # per row
        self.pos: dict[bytes, int] = {}     # listing id → its current row
        self._vectors = np.empty((0, 0), np.float32)  # searched exactly: row i holds the vector of ids[i]
        self._ivf = _ivf_beside(snapshot)
        # the snapshot's index owns the quantizer the delta's lists use: keep it alive as long as they are
        self._snapshot_index = snapshot.index if snapshot is not None and self._ivf is not None else None
        self.seen: str | None = None        # the pg_snapshot of the last read
        self.last_read = 0                  # rows the last top-up read
        self.reindex_requested = False

    def __len__(self) -> int:
        return len(self.pos)

    @property
    def exact(self) -> bool:
        return self._ivf is None

    def absorb(self, emb: sdb.Embeddings) -> None:
        """Add what a read returned. A re-embedded listing's vector is replaced in place when searched exactly;
        in IVF lists it gets a new row and hits on its old one are dropped."""
        self.seen = emb.read_snapshot
        self.last_read = len(emb)
        if not len(emb):
            return
        fresh = []
        for row, lid in enumerate(emb.ids.tolist()):
            at = self.pos.get(lid)
            if at is not None and self._ivf is None:
                self._vectors[at] = emb.vectors[row]
            else:
                fresh.append(row)
        n, need = len(self.ids), len(self.ids) + len(fresh)
        vectors = np.ascontiguousarray(emb.vectors[fresh], dtype=np.float32)
        if self._ivf is not None:
            self._ivf.add_with_ids(vectors, np.arange(n, need, dtype=np.int64))
        else:
            if need > len(self._vectors):  # doubling: O(1) per append over a day
                grown = np.empty((max(need, 1024, 2 * n), vectors.shape[1]), np.float32)
                if n:
                    grown[:n] = self._vectors[:n]
                self._vectors = grown
            self._vectors[n:need] = vectors
        for i, row in enumerate(fresh):
            lid = emb.ids[row]
            self.pos[lid] = n + i
            self.ids.append(lid)

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Per query, up to k (listing id, score) of the delta, best first."""
        if not self.ids:
            return [[] for _ in range(len(queries))]
        if self._ivf is not None:
            scores, rows = self._ivf.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        else:
            scores, rows = ix.exact_topk(queries, self._vectors[: len(self.ids)], k)
        return [[(self.ids[p].decode(), float(s))
                 for s, p in zip(sq, rq, strict=True) if p >= 0 and self.pos[self.ids[p]] == p]
                for sq, rq in zip(scores, rows, strict=True)]


def _ivf_beside(snapshot: Snapshot | None) -> faiss.IndexIVFFlat | None:
    """An empty IVF-Flat index on the snapshot's coarse quantizer and search settings; None for an exact one."""
    import faiss  # lazy: the CLI starts without faiss

    ivf = faiss.try_extract_index_ivf(snapshot.index) if snapshot is not None else None
    if ivf is None:
        return None
    index = faiss.IndexIVFFlat(ivf.quantizer, ivf.d, ivf.nlist, ivf.metric_type)
    index.nprobe = ivf.nprobe
    return index


_DELTAS: dict[str, Delta] = {}
LOCK = threading.Lock()  # held by a task from its top-up to the end of its search (threaded pools)


def _first_read(conn: psycopg.Connection, model_version: str, snap: Snapshot | None) -> sdb.Embeddings:
    if snap is None:
        return sdb.read_embeddings(conn, model_version)
    if snap.manifest.read_snapshot:
        return sdb.read_embeddings(conn, model_version, not_visible_in=snap.manifest.read_snapshot)
    after = datetime.fromisoformat(snap.manifest.read_at) - ONLINE_SLACK if snap.manifest.read_at else None
    return sdb.read_embeddings(conn, model_version, created_after=after.isoformat() if after else None)


def current_delta(conn: psycopg.Connection, model_version: str, snap: Snapshot | None, *,
                  settings: Settings) -> Delta:
    """This process's delta for the snapshot `snap`, topped up to what is committed now. Hold `LOCK` from this
    call to the end of the search over it."""
    delta = _DELTAS.get(model_version)
    path = snap.path if snap is not None else None
    if delta is None or delta.snapshot_path != path:
        delta = Delta(model_version, snap)
        delta.absorb(_first_read(conn, model_version, snap))
        _DELTAS.clear()  # a worker serves one model: the delta of one it served before is dead weight
        _DELTAS[model_version] = delta
        log.info("online delta of %s: %d listing(s) since %s", model_version, len(delta),
                 f"snapshot {path.name}" if path is not None else "the start (no snapshot yet)")
    else:
        delta.absorb(sdb.read_embeddings(conn, model_version, not_visible_in=delta.seen))
    metrics.ONLINE_ROWS_READ.inc(delta.last_read)
    metrics.ONLINE_DELTA.labels(model_version=model_version).set(len(delta))
    over = _over_bound(delta, settings)
    if over and not delta.reindex_requested:
        log.warning("%d listing(s) of %s written since %s (%s): asking for a reindex", len(delta), model_version,
                    "its snapshot" if snap is not None else "the start", over)
        try:  # the reindex chooses the model itself: during a backfill it refreshes the shelves that serve
            app.send_task(REINDEX_TASK, queue=settings.cpu_queue)
            delta.reindex_requested = True
        except Exception:
            log.warning("could not ask for a reindex", exc_info=True)
    return delta


def _over_bound(delta: Delta, settings: Settings) -> str | None:
    """Why this delta should be folded into a new snapshot, if it should."""
    if len(delta) > settings.online_delta_max:
        return f"> ENRICH_ONLINE_DELTA_MAX {settings.online_delta_max}: memory"
    if delta.exact and len(delta) > ix.FLAT_MAX:
        return f"> {ix.FLAT_MAX} searched exactly: an IVF snapshot keeps the search cost flat"
    return None


def held(model_version: str) -> int | None:
    """Listings in this process's delta of a model version; None when it holds none."""
    delta = _DELTAS.get(model_version)
    return len(delta) if delta is not None else None


def forget(model_version: str | None = None) -> None:
    """Drop this process's delta of a model version (all of them with None: tests)."""
    if model_version is None:
        _DELTAS.clear()
    else:
        _DELTAS.pop(model_version, None)
