"""/metrics of a prefork worker (`enrich worker -c 2`) counts what its child processes did."""
from __future__ import annotations

import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from core.celery_app import send_enrich
from core.config import Settings
from harness.cluster import worker_process_env
from harness.net import free_port, scrape_metrics
from schemas.events import ListingEvent
from tests.worker.conftest import AMQP, send_png, serve_gated, start_worker_process, stop_all, wait_until
from worker.store import upsert_listings

pytestmark = pytest.mark.integration


class _TwoAtOnce(BaseHTTPRequestHandler):
    """Answers image requests only once two have waited at the same time: two tasks in flight together, which a
    prefork worker runs in two child processes (a child runs one task at a time)."""

    lock = threading.Lock()
    arrived = 0
    both = threading.Event()

    def do_GET(self) -> None:
        cls = type(self)
        with cls.lock:
            cls.arrived += 1
            if cls.arrived >= 2:
                cls.both.set()
        if cls.both.wait(120):
            send_png(self, (200, 100, 0))

    def log_message(self, *args) -> None:
        pass


def _enriched(text: str | None) -> float:
    m = text and re.search(r'^enrich_listings_total\{outcome="enriched"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _per_process(tmp: Path, kind: str, sample: str, **labels: str) -> dict[int, float]:
    """pid → one series' value in each process's own file of the worker's prometheus multiprocess directory
    (`enrich worker` makes it with mkdtemp, under TMPDIR)."""
    values: dict[int, float] = {}
    for path in tmp.glob(f"enrich-prometheus-*/{kind}_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        for family in MultiProcessCollector.merge([str(path)]):
            for s in family.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    values[pid] = values.get(pid, 0.0) + s.value
    return values


def test_prefork_worker_metrics_sum_its_children(db, pg_url, model_dir, tmp_path, use_celery):
    server, base = serve_gated(_TwoAtOnce)
    queue = f"gpu-metrics-{uuid.uuid4().hex[:6]}"
    port = free_port()
    env = worker_process_env(pg_url, queue, model_dir=model_dir, torch_threads=1, fetch_timeout_s=150)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["TMPDIR"] = str(tmp_path)  # where the worker's multiprocess directory goes
    log = tmp_path / "worker.log"
    proc = start_worker_process(env, log, "-c", "2", "--metrics-port", str(port))
    try:
        # both children are up: each has loaded its model (ENRICH_MODEL_DIR, at the child's start)
        wait_until(lambda: list(_per_process(tmp_path, "gauge_max", "enrich_model_served").values()) == [1.0, 1.0]
                   or proc.poll() is not None, timeout=180)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert _enriched(scrape_metrics(port)) == 0.0
        ids = ["m0", "m1"]
        with db.transaction():
            upsert_listings(db, [ListingEvent(listing_id=i, seller_id="s", images=[f"{base}/{i}.png"]) for i in ids])

        settings = use_celery(Settings(celery_broker_url=AMQP, gpu_queue=queue))
        for i in ids:  # one task each, both held until the other one's image is asked for too
            send_enrich([i], settings)
        assert _TwoAtOnce.both.wait(120), log.read_text()[-3000:]
        wait_until(lambda: db.execute("SELECT count(*) FROM listings WHERE status = 'enriched'").fetchone()[0] == 2)
        # each child counted its own listing in its own file; the parent enriched nothing
        wait_until(lambda: sorted(_per_process(tmp_path, "counter", "enrich_listings_total",
                                               outcome="enriched").values()) == [1.0, 1.0])
        assert proc.pid not in _per_process(tmp_path, "counter", "enrich_listings_total", outcome="enriched")
        # /metrics, served by the parent, sums the children's files
        wait_until(lambda: _enriched(scrape_metrics(port)) == 2.0)
    finally:
        stop_all((proc,), server)
