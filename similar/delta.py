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

Memory: 4·dim bytes per listing written since the snapshot (1 KiB at 256 dimensions) in each worker
process, plus its id. Past ENRICH_ONLINE_DELTA_MAX listings a worker asks for a reindex (once per
snapshot); the finished reindex starts a new, small delta, and the search stays exact meanwhile.
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

import numpy as np
import psycopg

from core import metrics
from core.celery_app import REINDEX_TASK, app
from core.config import Settings
from similar import index as ix
from similar import store as sdb

log = logging.getLogger(__name__)

ONLINE_SLACK = timedelta(minutes=30)  # longest enrichment transaction we expect to be open (old snapshots only)


class Delta:
    """Listing ids and vectors of one model version written after `snapshot` (its directory, or None)."""

    def __init__(self, model_version: str, snapshot: ix.Snapshot | None) -> None:
        self.model_version = model_version
        self.snapshot_path = snapshot.path if snapshot is not None else None
        self.ids: list[bytes] = []
        self.pos: dict[bytes, int] = {}
        self._vectors: np.ndarray | None = None
        self.seen: str | None = None      # the pg_snapshot of the last read
        self.last_read = 0                # rows the last top-up read
        self.reindex_requested = False

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def vectors(self) -> np.ndarray:
        """(len, dim) float32; a view, valid until the next top-up."""
        if self._vectors is None:
            return np.empty((0, 0), np.float32)
        return self._vectors[: len(self.ids)]

    def absorb(self, emb: sdb.Embeddings) -> None:
        """Add what a read returned: new listings appended, re-embedded ones replaced in place."""
        self.seen = emb.read_snapshot
        self.last_read = len(emb)
        if not len(emb):
            return
        if self._vectors is None:
            self._vectors = np.empty((max(1024, len(emb)), emb.vectors.shape[1]), np.float32)
        fresh = []
        for row, lid in enumerate(emb.ids.tolist()):
            at = self.pos.get(lid)
            if at is None:
                fresh.append(row)
            else:
                self._vectors[at] = emb.vectors[row]
        n, need = len(self.ids), len(self.ids) + len(fresh)
        if need > len(self._vectors):  # doubling: appends cost O(1) each over a day
            grown = np.empty((max(need, 2 * len(self._vectors)), self._vectors.shape[1]), np.float32)
            grown[:n] = self._vectors[:n]
            self._vectors = grown
        self._vectors[n:need] = emb.vectors[fresh]
        for i, row in enumerate(fresh):
            lid = emb.ids[row]
            self.pos[lid] = n + i
            self.ids.append(lid)


_DELTAS: dict[str, Delta] = {}
LOCK = threading.Lock()  # held by a task from its top-up to the end of its search (threaded pools)


def _first_read(conn: psycopg.Connection, model_version: str, snap: ix.Snapshot | None) -> sdb.Embeddings:
    if snap is None:
        return sdb.read_embeddings(conn, model_version)
    if snap.manifest.read_snapshot:
        return sdb.read_embeddings(conn, model_version, not_visible_in=snap.manifest.read_snapshot)
    after = datetime.fromisoformat(snap.manifest.read_at) - ONLINE_SLACK if snap.manifest.read_at else None
    return sdb.read_embeddings(conn, model_version, created_after=after.isoformat() if after else None)


def current_delta(conn: psycopg.Connection, model_version: str, snap: ix.Snapshot | None, *,
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
    if snap is not None and len(delta) > settings.online_delta_max and not delta.reindex_requested:
        delta.reindex_requested = True
        log.warning("%d listing(s) of %s written since its snapshot (> ENRICH_ONLINE_DELTA_MAX %d): asking for "
                    "a reindex", len(delta), model_version, settings.online_delta_max)
        app.send_task(REINDEX_TASK, kwargs={"model_version": model_version}, queue=settings.cpu_queue)
    return delta


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
