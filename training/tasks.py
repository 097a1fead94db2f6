"""Celery tasks of the train queue (thin wrappers over training.jobs); run them on a worker of their own:
`enrich worker -Q train` (one process: jobs train one at a time anyway).

"enrich.retrain"(job_id)     runs a queued training job to its end. Only one trains at a time (a Postgres
                             advisory lock): a job that finds it taken stays queued and the task retries
                             every LOCK_RETRY_S. Acked on receipt, not after: a job lasts longer than a
                             broker waits for an ack (Redis visibility timeout, RabbitMQ consumer timeout),
                             and the job's row, not the message, is its state — a job whose worker dies is
                             marked failed by the next job, beat tick or train worker's start (below), or
                             by whoever reads the jobs once its heartbeat is older than ENRICH_JOB_STALE_S.
"enrich.retrain_scheduled"   beat (ENRICH_RETRAIN_CRON): a job when enough corrections arrived since the
                             last one that trained, else a 'skipped' row saying why.

A worker serving the train queue, as it starts, marks failed the jobs no worker will finish (`jobs.reap_dead`).
"""
from __future__ import annotations

from celery.signals import worker_ready
from celery.utils.log import get_task_logger

from core.celery_app import RETRAIN_TASK, app, task_settings
from core.db import connect, database_url

log = get_task_logger(__name__)

RETRAIN_SCHEDULED_TASK = "enrich.retrain_scheduled"
LOCK_RETRY_S = 60.0  # how often a job waiting for the training lock tries again
TRAIN_TIME_LIMIT_S = 24 * 3600  # prefork pools only (the solo pool has no time limits)


@app.task(name=RETRAIN_TASK, bind=True, acks_late=False, max_retries=None, ignore_result=True,
          time_limit=TRAIN_TIME_LIMIT_S, soft_time_limit=TRAIN_TIME_LIMIT_S - 300)
def retrain(self, job_id: int) -> dict:
    from training import jobs  # lazy: every worker loads this module, only a train worker needs torch

    settings = task_settings()
    try:
        return jobs.run_job(database_url(settings), int(job_id), settings)
    except jobs.JobBusy as exc:
        log.info("%s; trying again in %.0fs", exc, LOCK_RETRY_S)
        # back onto the queue it came from (a deployment or a test may use another than "train")
        queue = (self.request.delivery_info or {}).get("routing_key")
        raise self.retry(countdown=LOCK_RETRY_S, **({"queue": queue} if queue else {})) from exc


@worker_ready.connect
def reap_dead_jobs(sender=None, **_) -> None:
    from training import jobs  # lazy: every worker loads this module, only a train worker needs torch

    """A train worker's start: the jobs whose worker died are marked failed now, not at the next job or tick.
    Never stops the worker from starting (the database may be down: it is logged)."""
    settings = task_settings()
    queues = sender.app.amqp.queues.consume_from if sender is not None else None
    if not queues or settings.train_queue not in queues:
        return  # not a train worker
    try:
        with connect(database_url(settings), autocommit=True) as conn:
            jobs.reap_dead(conn, settings.job_stale_s)
    except Exception as exc:
        log.warning("dead training jobs not checked at start: %s", exc)


@app.task(name=RETRAIN_SCHEDULED_TASK, ignore_result=True)
def retrain_scheduled() -> dict:
    from training import jobs  # lazy: every worker loads this module, only a train worker needs torch

    settings = task_settings()
    conn = connect(database_url(settings), autocommit=True)
    try:
        return jobs.schedule_retrain(conn, settings)
    finally:
        conn.close()
