"""Celery tasks of the workers: enrichment batches (queue "gpu"; lists of listing ids, never images), the
pending sweep, the review order and beat's tick (queue "cpu"). The worker-process signals that start and stop
`runtime` live here.
"""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import psycopg
from celery.signals import task_postrun, task_prerun, worker_process_init, worker_process_shutdown, worker_shutdown
from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval
from psycopg.rows import scalar_row
from psycopg.types.json import Jsonb

from core import metrics
from core.celery_app import BEAT_TICK_TASK, ENRICH_TASK, REVIEW_ORDER_TASK, SWEEP_TASK, app, send_enrich, task_settings
from core.config import Settings
from schemas.enrichment import Enrichment
from worker import runtime
from worker.review_priority import reprioritise
from worker.shadow import run_shadow
from worker.store import claim_stale_pending

if TYPE_CHECKING:
    from worker.pipeline import Enricher  # imports torch, which cpu and train workers never load

log = get_task_logger(__name__)


@worker_process_init.connect
def _start_process(**_kwargs) -> None:
    # every process that runs tasks (the solo worker, each prefork child after the fork: CUDA contexts and
    # threads do not survive a fork) starts its registry timer; only gpu/backfill workers load a model
    queues = app.amqp.queues
    runtime.start(task_settings(), list(queues.consume_from or queues))


@worker_process_shutdown.connect
@worker_shutdown.connect
def _stop_process(**_kwargs) -> None:
    runtime.stop(task_settings())


@task_prerun.connect
def _task_started(**_kwargs) -> None:
    runtime.task_started()


@task_postrun.connect
def _task_finished(**_kwargs) -> None:
    # the task lets its model go; one that finished loading meanwhile is served from now on
    runtime.task_finished()


def backoff_s(retries: int, base: float, cap: float = 600.0) -> float:
    """Exponential backoff: base, 2·base, 4·base… at most ``cap``."""
    return min(base * (2 ** retries), cap)


@app.task(name=ENRICH_TASK, bind=True, acks_late=True, ignore_result=True)
def enrich_listings(self, listing_ids: list[str]) -> dict[str, int]:
    """Enrich a batch of listings. Safe to run twice: finished listings are skipped.

    Transient image faults (host down) re-enqueue only the affected listings with backoff; on the
    last attempt whatever images are usable are used, and a listing with none is marked failed.
    Permanent faults (bad image) never retry. A lost database connection retries the whole batch.
    """
    settings = task_settings()
    enricher = runtime.enricher(settings)
    last_try = self.request.retries >= settings.task_max_retries
    metrics.TASK_LISTINGS.observe(len(listing_ids))
    try:
        with metrics.TASK_SECONDS.time(), runtime.pool(settings).connection() as conn:
            out = enricher.run(conn, listing_ids, accept_partial=last_try)
            shadow = runtime.shadow_enricher()
            if shadow is not None and out.enriched:
                _shadow(conn, shadow, out.enriched, settings.shadow_share)
    except psycopg.OperationalError as exc:
        delay = get_exponential_backoff_interval(5, self.request.retries, 300, full_jitter=True)
        raise self.retry(exc=exc, countdown=delay, max_retries=settings.task_max_retries) from exc
    log.info("batch of %d: %d enriched, %d failed, %d skipped, %d to retry (%d images)",
             len(listing_ids), len(out.enriched), len(out.failed), len(out.skipped), len(out.retry), out.images)
    if out.retry:
        delay = backoff_s(self.request.retries, settings.retry_backoff_s, settings.retry_backoff_max_s)
        raise self.retry(args=(sorted(out.retry),), countdown=delay, max_retries=settings.task_max_retries)
    return {"enriched": len(out.enriched), "failed": len(out.failed), "skipped": len(out.skipped)}


def _shadow(conn: psycopg.Connection, shadow: Enricher, enriched: list[Enrichment], share: float) -> None:
    try:
        run_shadow(conn, shadow, enriched, share)
    except Exception:
        log.exception("shadow model %s failed on this batch", shadow.model_version)


def sweep_pending(conn: psycopg.Connection, settings: Settings, older_than_s: float | None = None) -> int:
    """Enqueue again, in task-sized chunks, the listings left pending too long. Returns how many."""
    after = settings.pending_sweep_after_s if older_than_s is None else older_than_s
    with conn.transaction():  # a failed send leaves the rows unclaimed for the next sweep
        ids = claim_stale_pending(conn, after)
        for i in range(0, len(ids), settings.task_listings):
            send_enrich(ids[i:i + settings.task_listings], settings)
    if ids:
        log.warning("%d listing(s) pending for over %.0fs enqueued again (oldest: %s)", len(ids), after, ids[0])
    return len(ids)


@app.task(name=SWEEP_TASK, ignore_result=True)
def sweep_pending_task() -> int:
    """Beat, queue "cpu": a lost task must not leave a listing pending forever."""
    settings = task_settings()
    with runtime.pool(settings).connection() as conn:
        return sweep_pending(conn, settings)


@app.task(name=REVIEW_ORDER_TASK, ignore_result=True)
def review_order_task() -> int:
    """Beat, queue "cpu", every ENRICH_REVIEW_REPRIORITISE_S: rank the open review items by expected gain."""
    settings = task_settings()
    with runtime.pool(settings).connection() as conn:
        return reprioritise(conn, settings)


def record_beat(conn: psycopg.Connection, details: dict[str, Any]) -> None:
    """Beat was seen now (its tick ran on a cpu worker)."""
    conn.execute("INSERT INTO heartbeats (name, seen_at, details) VALUES ('beat', now(), %s)"
                 " ON CONFLICT (name) DO UPDATE SET seen_at = now(), details = EXCLUDED.details",
                 (Jsonb(details),))


def beat_age_s(conn: psycopg.Connection) -> float | None:
    """Seconds since beat's last tick ran; None when it never did."""
    with conn.cursor(row_factory=scalar_row) as cur:
        age = cur.execute("SELECT extract(epoch FROM now() - seen_at) FROM heartbeats WHERE name = 'beat'").fetchone()
    return None if age is None else float(age)


@app.task(name=BEAT_TICK_TASK, ignore_result=True)
def beat_tick() -> None:
    """Beat, queue "cpu", every ENRICH_BEAT_TICK_S: beat is alive and a worker serves the cpu queue."""
    settings = task_settings()
    with runtime.pool(settings).connection() as conn:
        record_beat(conn, {"worker": socket.gethostname()})
