"""Celery tasks for the nightly similar-items recompute (thin wrappers over similar.nightly).

"enrich.reindex"        nightly (beat, queue "cpu"): shards <= 1 → the whole recompute in this
                        worker; shards > 1 → read/build/snapshot here, then a chord of
                        "enrich.reindex_shard" (one per listing-id range, or list range past 2 M
                        listings; any worker that sees the snapshot directory or ENRICH_INDEX_URI)
                        whose callback "enrich.reindex_finish"
                        switches versions. Shards default to ENRICH_REINDEX_SHARDS; more than one needs
                        a result backend that joins chords (ENRICH_CELERY_RESULT_BACKEND, Redis).
"enrich.reindex_shard"  top-K for one id (or list) range into the building version; re-running it replaces the
                        range, so acks_late redelivery is safe. A transient fault (database
                        connection, snapshot download) retries this shard alone, with backoff, at most
                        ENRICH_TASK_MAX_RETRIES times; the other shards keep what they wrote.
"enrich.reindex_finish" checks every shard wrote its rows, switches atomically, prunes.
"enrich.reindex_failed" the chord's error callback: a shard failed for good, so the version is marked
                        failed with the reason (the active version stays).
Tasks pass ids and bounds, never vectors. After a switch, models beyond ENRICH_KEEP_MODEL_VERSIONS
that were active lose their embeddings and shelves (`nightly.prune_models`; never the active model nor
the one serving). The catalogue backfill enqueues "enrich.reindex" for its model when it finishes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from botocore.exceptions import BotoCoreError, ClientError
from celery import chord
from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval

from core.celery_app import REINDEX_TASK, app, task_settings
from core.config import Settings
from core.db import DatabaseUnavailable, connect, database_url
from similar import nightly
from similar import store as sdb
from similar.nightly import Bound

log = get_task_logger(__name__)

SHARD_TASK = "enrich.reindex_shard"
FINISH_TASK = "enrich.reindex_finish"
FAILED_TASK = "enrich.reindex_failed"
# worth another try of the same shard: the database connection, the snapshot's download or its file not
# visible yet on a shared volume (OSError covers both)
TRANSIENT = (psycopg.OperationalError, DatabaseUnavailable, OSError, BotoCoreError, ClientError)


def _conn(settings: Settings) -> psycopg.Connection:
    return connect(database_url(settings), autocommit=True)


def _prune_models(conn: psycopg.Connection, settings: Settings) -> None:
    try:
        nightly.prune_models(conn, settings=settings)
    except Exception:
        log.exception("pruning old model versions failed")


def chords_unavailable() -> str | None:
    """Why this app cannot run a sharded reindex (its result backend cannot join a chord), or None."""
    try:
        app.backend.ensure_chords_allowed()
    except NotImplementedError:
        backend = app.conf.result_backend
        now = "none is set" if not backend else f"{str(backend).split(':')[0]}:// cannot"
        return (f"a sharded reindex needs a Celery result backend that joins chords (its shards report to it); "
                f"{now}: set ENRICH_CELERY_RESULT_BACKEND, e.g. redis://<host>:6379/1, for this command and "
                f"every cpu worker, or use one shard")
    return None


def dispatch_shards(version: int, bounds: Sequence[tuple[Bound, Bound]], keep: int = 1) -> Any:
    """Start the chord over a prepared version's ranges; returns its result (the finish task's AsyncResult)."""
    finish = reindex_finish.si(version, keep).on_error(reindex_failed.s(version))
    return chord(reindex_shard.s(version, lo, hi) for lo, hi in bounds)(finish)


@app.task(name=REINDEX_TASK, time_limit=3 * 3600, soft_time_limit=3 * 3600 - 60)
def reindex(model_version: str | None = None, k: int | None = None, shards: int | None = None,
            factory: str | None = None, nprobe: int | None = None, keep: int = 1) -> dict[str, int] | None:
    settings = task_settings()
    shards = settings.reindex_shards if shards is None else shards
    if shards > 1 and (why := chords_unavailable()):
        raise RuntimeError(why)  # before any work: the chord could not even start
    conn = _conn(settings)
    try:
        if shards <= 1:
            result = nightly.recompute(conn, model_version, settings=settings, k=k, factory=factory, nprobe=nprobe,
                                       keep_versions=keep)
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
    dispatch_shards(version, bounds, keep)
    return {"version": version, "shards": len(bounds)}


@app.task(name=SHARD_TASK, bind=True, acks_late=True, time_limit=3600, soft_time_limit=3540)
def reindex_shard(self: Any, version: int, lo: Bound, hi: Bound) -> int:
    settings = task_settings()
    try:
        conn = _conn(settings)
        try:
            return nightly.compute_shard(conn, version, lo, hi, settings=settings)
        finally:
            conn.close()
    except TRANSIENT as exc:
        # only this range runs again; it deletes what an earlier try of it wrote first
        delay = get_exponential_backoff_interval(settings.retry_backoff_s, self.request.retries,
                                                 settings.retry_backoff_max_s, full_jitter=False)
        log.warning("shard [%s, %s) of version %d: %r; retry %d of %d in %.0fs", lo, hi, version, exc,
                    self.request.retries + 1, settings.task_max_retries, delay)
        raise self.retry(exc=exc, countdown=delay, max_retries=settings.task_max_retries) from exc


@app.task(name=FINISH_TASK)
def reindex_finish(version: int, keep: int = 1) -> dict[str, int]:
    settings = task_settings()
    conn = _conn(settings)
    try:
        result = nightly.finish_shards(conn, version, keep_versions=keep, settings=settings)
        _prune_models(conn, settings)
    finally:
        conn.close()
    log.info(result.summary())
    return {"version": result.version, "count": result.count}


@app.task(name=FAILED_TASK)
def reindex_failed(request: Any, exc: BaseException, traceback: Any, version: int) -> None:
    """Error callback of the chord (called with the failure first): a shard failed for good, so this
    version will never switch; record why instead of leaving it 'building' until the next run."""
    settings = task_settings()
    conn = _conn(settings)
    try:
        sdb.mark_failed(conn, [version], f"a shard failed: {exc}")
    finally:
        conn.close()
