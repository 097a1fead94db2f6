"""The overview: what is waiting (queue, pending, failed, review backlog per group), which workers run, on which
queues, and which model each serves."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from core.celery_app import queue_depth
from core.config import Settings
from core.rows import fetch_all, fetch_one, fetch_value
from enrich.console.auth import User, current_user
from enrich.console.deps import connection, render

log = logging.getLogger(__name__)
router = APIRouter()


def _queue_depth(settings: Settings) -> int | None:
    try:
        return queue_depth(settings.gpu_queue)
    except Exception:
        log.warning("broker not reachable for the queue depth", exc_info=True)
        return None


_DLQ_CACHE_S = 30.0


def _dead_letters(app: FastAPI) -> int | None:
    """Events in the dead-letter topic (end − beginning offsets), cached: Kafka may be slow or away."""
    cached = getattr(app.state, "dlq", None)
    if cached is not None and time.monotonic() - cached[0] < _DLQ_CACHE_S:
        return cached[1]
    settings, count = app.state.settings, None
    try:
        from kafka import KafkaConsumer, TopicPartition  # lazy: only this count needs the Kafka client

        consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=3000,
                                 bootstrap_timeout_ms=2000, connections_max_idle_ms=5000)
        try:
            parts = [TopicPartition(settings.dlq_topic, p) for p in consumer.partitions_for_topic(settings.dlq_topic)
                     or ()]
            ends, starts = consumer.end_offsets(parts), consumer.beginning_offsets(parts)
            count = sum(ends[tp] - starts[tp] for tp in parts)
        finally:
            consumer.close()
    except Exception:
        log.info("dead-letter topic not readable", exc_info=True)
    app.state.dlq = (time.monotonic(), count)
    return count


@dataclass(frozen=True)
class ActiveModel:
    model_version: str
    promoted_at: datetime | None


@dataclass(frozen=True)
class WorkerRow:
    """A worker process as it last reported itself (those serving no model have no versions)."""
    worker: str
    queues: str | None
    model_version: str | None
    shadow_version: str | None
    seen_at: datetime


def overview_figures(conn: psycopg.Connection) -> dict[str, Any]:
    status: dict[str, int] = dict(conn.execute("SELECT status, count(*) FROM listings GROUP BY status").fetchall())
    backlog: list[tuple[str, int]] = [(g, n) for g, n in conn.execute(
        "SELECT tag_group, count(*) FROM review_queue WHERE resolved_at IS NULL"
        " GROUP BY tag_group ORDER BY count(*) DESC, tag_group")]
    active = fetch_one(conn, ActiveModel, "SELECT model_version, promoted_at FROM models WHERE status = 'active'")
    # every worker process (gpu, backfill, cpu, train) reports on its timer
    workers = fetch_all(conn, WorkerRow, "SELECT worker, queues, model_version, shadow_version, seen_at"
                        " FROM worker_status WHERE seen_at > now() - interval '10 minutes' ORDER BY queues, worker")
    corrections = fetch_value(conn, "SELECT count(*) FROM corrections WHERE received_at > now() - interval '1 day'")
    return {"status": status, "backlog": backlog, "active": active, "workers": workers,
            "corrections_day": corrections}


@router.get("/")
def overview(request: Request, user: User = Depends(current_user)) -> Response:
    with connection(request) as conn:
        figures = overview_figures(conn)
    return render(request, "overview.html", user=user, page="overview",
                  queue_depth=_queue_depth(request.app.state.settings), dead_letters=_dead_letters(request.app),
                  **figures)
