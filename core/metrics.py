"""Prometheus metrics and the health endpoint shared by intake and workers.

`serve(port, checks)` starts one small HTTP server per process: /metrics (Prometheus text format)
and /healthz (JSON, 200 when every check passes, 503 otherwise). A prefork Celery worker counts in
its child processes: with PROMETHEUS_MULTIPROC_DIR set before prometheus_client is first imported
(`enrich worker -c N` does that), they write their values to files that /metrics sums.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

log = logging.getLogger(__name__)

EVENTS_CONSUMED = Counter("enrich_events_consumed_total", "Kafka events read by the intake", ["topic"])
DEAD_LETTERS = Counter("enrich_dead_letters_total", "Events sent to a dead-letter topic, by reason", ["reason"])
LISTINGS_ENQUEUED = Counter("enrich_listings_enqueued_total", "Listing ids sent to the GPU queue")
IMAGES_REJECTED = Counter("enrich_images_rejected_total", "Images refused or unreachable", ["reason"])
LISTINGS_DONE = Counter("enrich_listings_total", "Listings processed by the enrichment core", ["outcome"])
TAGS_WRITTEN = Counter("enrich_tags_written_total", "Tags written", ["source"])
REVIEW_ITEMS = Counter("enrich_review_items_total", "Predictions below threshold sent to review", ["group"])
BATCH_SIZE = Histogram("enrich_batch_images", "Images per model forward batch",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
MODEL_LATENCY = Histogram("enrich_model_seconds", "Model forward time per batch",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
FETCH_LATENCY = Histogram("enrich_image_fetch_seconds", "Fetch + decode time per image",
                          buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10))
ONLINE_ROWS_READ = Counter("enrich_online_rows_read_total", "Embedding rows the online neighbour search read from "
                           "Postgres to top up its delta")
ONLINE_DELTA = Gauge("enrich_online_delta_listings", "Listings written since the similar-items snapshot held by this "
                     "worker process for online neighbours", ["model_version"],
                     multiprocess_mode="max")
TASK_SECONDS = Histogram("enrich_task_seconds", "Enrichment task time (fetch, model, writes, online neighbours)",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
TASK_LISTINGS = Histogram("enrich_task_listings", "Listings per enrichment task",
                          buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
QUEUE_DEPTH = Gauge("enrich_queue_depth", "Messages waiting in the GPU queue (as seen by the intake)")
SNAPSHOT_BUILT = Gauge("enrich_similar_snapshot_built_timestamp_seconds",
                       "When the similar-items snapshot this worker searches was built (alert when it gets old: "
                       "the nightly job or its S3 publishing stopped)", ["model_version"], multiprocess_mode="max")
MODEL_SERVED = Gauge("enrich_model_served", "1 for the model version this worker serves (0 once replaced)",
                     ["model_version"], multiprocess_mode="max")
INTAKE_PAUSED = Gauge("enrich_intake_paused", "1 while the intake stops polling for back-pressure")
INTAKE_LAG = Gauge("enrich_intake_lag", "Events of a partition this intake holds not yet written and committed: "
                   "end offset - committed offset (the series goes when a rebalance takes the partition away)",
                   ["topic", "partition"])
# catalogue backfill after a promotion (worker/backfill.py); progress is also in the `backfills` table
BACKFILL_REMAINING = Gauge("enrich_backfill_remaining", "Listings the catalogue backfill has yet to re-embed under a "
                           "model version (0 once done or cancelled)", ["model_version"],
                           multiprocess_mode="mostrecent")
BACKFILL_LISTINGS = Counter("enrich_backfill_listings_total", "Listings the catalogue backfill processed",
                            ["outcome"])
BACKFILL_PAUSES = Counter("enrich_backfill_pauses_total", "Times the backfill stepped aside: live enrichment "
                          "queued, or this worker still loading the new model", ["reason"])

HealthCheck = Callable[[], None]  # raises when unhealthy


def _registry() -> CollectorRegistry:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    # every process's files, summed per series
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated in prometheus_client
    return registry


def served_versions() -> list[str]:
    """The model versions this process serves now (`enrich_model_served` at 1); in a prefork worker, its
    children's (their files), so the parent's /healthz tells whether they have a model."""
    return sorted({sample.labels["model_version"] for family in _registry().collect()
                   if family.name == "enrich_model_served" for sample in family.samples if sample.value == 1})


def run_checks(checks: dict[str, HealthCheck]) -> tuple[bool, dict[str, str]]:
    results: dict[str, str] = {}
    ok = True
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:
            ok = False
            results[name] = f"{type(exc).__name__}: {exc}"[:300]
    return ok, results


def serve(port: int, checks: dict[str, HealthCheck], host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start /metrics and /healthz on a daemon thread; returns the server (call .shutdown() to stop)."""

    registry = _registry()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif self.path.startswith("/healthz"):
                ok, results = run_checks(checks)
                body = json.dumps({"ok": ok, "checks": results}).encode()
                status, ctype = (200 if ok else 503), "application/json"
            else:
                body, status, ctype = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:  # scrapes every few seconds: keep them out of the log
            log.debug(fmt, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics and health on http://%s:%d/metrics and /healthz", host, server.server_address[1])
    return server
