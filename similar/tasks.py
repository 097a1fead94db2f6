"""Celery tasks for the nightly similar-items recompute (thin wrappers over similar.shelves).

"enrich.reindex"        nightly (beat, queue "cpu"): shards <= 1 → the whole recompute in this
                        worker; shards > 1 → read/build/snapshot here, then a chord of
                        "enrich.reindex_shard" (one per listing-id range, any worker that sees the
                        snapshot directory) whose callback "enrich.reindex_finish" switches versions.
"enrich.reindex_shard"  top-K for one id range into the building version; re-running it replaces the
                        range, so acks_late redelivery is safe.
"enrich.reindex_finish" checks every listing was written, switches atomically, prunes.
Tasks pass ids and bounds, never vectors.
"""
from __future__ import annotations

from celery import chord
from celery.utils.log import get_task_logger

from core.db import connect
from similar import shelves as similar
from core.celery_app import app

log = get_task_logger(__name__)


def _conn():
    return connect(autocommit=True)


@app.task(name="enrich.reindex", ignore_result=True, time_limit=3 * 3600, soft_time_limit=3 * 3600 - 60)
def reindex(model_version: str | None = None, k: int | None = None, shards: int = 1,
            factory: str | None = None, nprobe: int | None = None) -> dict | None:
    conn = _conn()
    try:
        if shards <= 1:
            try:
                result = similar.recompute(conn, model_version, k=k, factory=factory, nprobe=nprobe)
            except similar.ReindexBusy as exc:
                log.warning("%s; skipping this run", exc)
                return None
            log.info(result.summary())
            return {"version": result.version, "count": result.count}
        version, bounds = similar.prepare_shards(conn, model_version, shards, k=k, factory=factory, nprobe=nprobe)
    finally:
        conn.close()
    log.info("similar-items version %d: dispatching %d shards", version, len(bounds))
    chord(reindex_shard.s(version, lo, hi) for lo, hi in bounds)(reindex_finish.si(version))
    return {"version": version, "shards": len(bounds)}


@app.task(name="enrich.reindex_shard", time_limit=3600, soft_time_limit=3540)
def reindex_shard(version: int, lo: str | None, hi: str | None) -> int:
    conn = _conn()
    try:
        return similar.compute_shard(conn, version, lo, hi)
    finally:
        conn.close()


@app.task(name="enrich.reindex_finish", ignore_result=True)
def reindex_finish(version: int) -> dict:
    conn = _conn()
    try:
        result = similar.finish_shards(conn, version)
    finally:
        conn.close()
    log.info(result.summary())
    return {"version": result.version, "count": result.count}
