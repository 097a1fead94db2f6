"""The Celery app: enrichment on queue "gpu" (acks late, prefetch: `enrich worker`), nightly reindex by beat.

Beat keeps its schedule in `<data dir>/celerybeat-schedule` (never the working directory, which the image's
user cannot write) and ticks every ENRICH_BEAT_TICK_S on the cpu queue, so `enrich health --beat` can tell
when beat, or every cpu worker, is gone.

Broker from ENRICH_CELERY_BROKER_URL: RabbitMQ (amqp://) in production, Redis (redis://) also works.
Every queue name is a setting (ENRICH_GPU_QUEUE, _BACKFILL_QUEUE, _CPU_QUEUE, _TRAIN_QUEUE), so two
deployments can share one broker vhost.
"""
from __future__ import annotations

from pathlib import Path

from celery import Celery
from celery.schedules import crontab
from kombu import Connection
from kombu.exceptions import ChannelError

from core.config import Settings, get_settings

ENRICH_TASK = "enrich.listings"
SWEEP_TASK = "enrich.sweep_pending"
REVIEW_ORDER_TASK = "enrich.review_order"
BACKFILL_TASK = "enrich.backfill"
RETRAIN_TASK = "enrich.retrain"
BEAT_TICK_TASK = "enrich.beat_tick"
REINDEX_TASK = "enrich.reindex"

app = Celery("enrich", include=["worker.tasks", "worker.backfill", "similar.tasks", "training.tasks"])


def configure(settings: Settings) -> Celery:
    """Apply settings to the app; called at process start (CLI commands, worker) and by tests."""
    app.conf.update(
        broker_url=settings.celery_broker_url,
        result_backend=settings.celery_result_backend,
        task_ignore_result=settings.celery_result_backend is None,
        task_serializer="json",
        accept_content=["json"],
        # CPU-bound jobs (reindex, sweep) by default; keep them off the GPU workers
        task_default_queue=settings.cpu_queue,
        task_routes={ENRICH_TASK: {"queue": settings.gpu_queue}, BACKFILL_TASK: {"queue": settings.backfill_queue},
                     RETRAIN_TASK: {"queue": settings.train_queue}},
        # a GPU worker acks a batch after writing it: a crash (kill -9, OOM) puts the batch (and the one it
        # holds next: worker/cli.py SOLO_PREFETCH) back on the queue; tasks are idempotent, a rerun changes nothing
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=600,
        task_soft_time_limit=540,
        broker_connection_retry_on_startup=True,
        # Redis: redeliver an unacked batch after this long (must exceed the longest batch)
        broker_transport_options={"visibility_timeout": 3600},
        worker_hijack_root_logger=False,
        beat_schedule_filename=str(beat_schedule_file(settings)),
        beat_schedule={
            # beat's liveness (heartbeats('beat')); a tick that waited longer than one period is dropped
            "beat-tick": {"task": BEAT_TICK_TASK, "schedule": settings.beat_tick_s,
                          "options": {"queue": settings.cpu_queue, "expires": settings.beat_tick_s}},
            # ENRICH_REINDEX_SHARDS > 1: a chord of shards over the cpu workers (needs the result backend)
            "nightly-similar-items": {"task": REINDEX_TASK, "schedule": crontab(hour=2, minute=30),
                                      "kwargs": {"shards": settings.reindex_shards},
                                      "options": {"queue": settings.cpu_queue}},
            # listings whose enrichment task was lost are enqueued again (tasks are idempotent)
            "sweep-pending": {"task": SWEEP_TASK, "schedule": settings.pending_sweep_every_s,
                              "options": {"queue": settings.cpu_queue}},
            # the open review items ranked again for the console's "gain" order (worker.review_priority)
            **({"review-order": {"task": REVIEW_ORDER_TASK, "schedule": settings.review_reprioritise_s,
                                 "options": {"queue": settings.cpu_queue}}} if settings.review_order == "gain" else {}),
            # periodic retraining job (training.tasks; it skips, saying why, when too few corrections came)
            **({"scheduled-retrain": {"task": "enrich.retrain_scheduled",
                                      "schedule": crontab.from_string(settings.retrain_cron),
                                      "options": {"queue": settings.train_queue}}} if settings.retrain_cron else {}),
        },
        timezone="UTC",
    )
    app.conf.enrich_settings = settings
    # connections made under an earlier broker URL must not be reused (tests, CLI overrides)
    app._pool = None
    # nor a result backend made under an earlier one (cached on the app, or per thread)
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)
    if "amqp" in app.__dict__:
        app.amqp._producer_pool = None
    return app


def beat_schedule_file(settings: Settings) -> Path:
    """Where beat keeps its schedule (the last run of each entry): the data directory."""
    return settings.data_dir / "celerybeat-schedule"


def task_settings() -> Settings:
    """The Settings this worker process was started with (`configure`); read by task bodies.

    A worker started by `celery -A core.celery_app` rather than `enrich worker` reads the environment once.
    """
    settings = app.conf.get("enrich_settings")
    if isinstance(settings, Settings):
        return settings
    settings = get_settings()
    configure(settings)
    return settings


def send_enrich(listing_ids: list[str], settings: Settings) -> None:
    """Enqueue one batch of listing ids on the GPU queue (by name: the intake needs no model code)."""
    app.send_task(ENRICH_TASK, args=[list(listing_ids)], queue=settings.gpu_queue)


def send_backfill(model_version: str) -> None:
    """Start re-embedding the catalogue under a newly active model (by name: the registry needs no worker code)."""
    app.send_task(BACKFILL_TASK, args=[model_version], queue=task_settings().backfill_queue)


def queue_depth(queue: str, connection: Connection | None = None) -> int:
    """Messages waiting in a broker queue (RabbitMQ and Redis alike); 0 if it does not exist yet."""
    own = connection is None
    conn = connection or app.connection_for_read()
    try:
        # a fresh channel per check: amqp closes a channel after a passive declare of a missing queue
        channel = conn.channel()
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except ChannelError:
            return 0
        finally:
            try:
                channel.close()
            except Exception:
                pass
    finally:
        if own:
            conn.release()
