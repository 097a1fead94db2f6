"""Celery tasks for the nightly similar-items recompute (thin wrappers over similar.nightly).

"enrich.reindex"        nightly (beat, queue "cpu"): shards <= 1 → the whole recompute in this
                        worker; shards > 1 → read/build/snapshot here, then a chord of
                        "enrich.reindex_shard" (one per listing-id range, any worker that sees the
                        snapshot directory) whose callback "enrich.reindex_finish" switches versions.
"enrich.reindex_shard"  top-K for one id range into the building version; re-running it replaces the
                        range, so acks_late redelivery is safe.
"enrich.reindex_finish" checks every listing was written, switches atomically, prunes.
Tasks pass ids and bounds, never vectors. After a switch, models beyond ENRICH_KEEP_MODEL_VERSIONS
that were active lose their embeddings and shelves (`nightly.prune_models`; never the active model nor
the one serving). The catalogue backfill enqueues "enrich.reindex" for its model when it finishes.
"""
from __future__ import annotations

import psycopg
from celery import chord
from celery.utils.log import get_task_logger

from core.celery_app import REINDEX_TASK, app, task_settings
from core.config import Settings
from core.db import connect, database_url
from similar import nightly

log = get_task_logger(__name__)


def _conn(settings: Settings) -> psycopg.Connection:
    return connect(database_url(settings), autocommit=True)


def _prune_models(conn: psycopg.Connection, settings: Settings) -> None:
    try:
        nightly.prune_models(conn, settings=settings)
    except Exception:  # noqa: BLE001 - the new version serves; pruning is tried again after the next switch
        log.exception("pruning old model versions failed")


@app.task(name=REINDEX_TASK, ignore_result=True, time_limit=3 * 3600, soft_time_limit=3 * 3600 - 60)
def reindex(model_version: str | None = None, k: int | None = None, shards: int = 1,
            factory: str | None = None, nprobe: int | None = None) -> dict | None:
    settings = task_settings()
    conn = _conn(settings)
    try:
        if shards <= 1:
            result = nightly.recompute(conn, model_version, settings=settings, k=k, factory=factory, nprobe=nprobe)
            _prune_models(conn, settings)
        else:
            version, bounds = nightly.prepare_shards(conn, model_version, shards, settings=settings, k=k,
                                                     factory=factory, nprobe=nprobe)
    except nightly.ReindexBusy as exc:
        log.warning("%s; skipping this run", exc)
        return None
    finally:
        conn.close()
    if shards <= 1:
        log.info(result.summary())
        return {"version": result.version, "count": result.count}
    log.info("similar-items version %d: dispatching %d shards", version, len(bounds))
    chord(reindex_shard.s(version, lo, hi) for lo, hi in bounds)(reindex_finish.si(version))
    return {"version": version, "shards": len(bounds)}


@app.task(name="enrich.reindex_shard", time_limit=3600, soft_time_limit=3540)
def reindex_shard(version: int, lo: str | None, hi: str | None) -> int:
    settings = task_settings()
    conn = _conn(settings)
    try:
        return nightly.compute_shard(conn, version, lo, hi, settings=settings)
    finally:
        conn.close()


@app.task(name="enrich.reindex_finish", ignore_result=True)
def reindex_finish(version: int) -> dict:
    settings = task_settings()
    conn = _conn(settings)
    try:
        result = nightly.finish_shards(conn, version, settings=settings)
        _prune_models(conn, settings)
    finally:
        conn.close()
    log.info(result.summary())
    return {"version": result.version, "count": result.count}
