"""End to end on real parts: Kafka → intake → Celery (Redis broker, real worker) → model → Postgres."""
from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest
from celery.contrib.testing.worker import start_worker
from kafka import KafkaProducer
from typer.testing import CliRunner

import worker.tasks  # noqa: F401 - registers the tasks
from core.celery_app import SWEEP_TASK, app, queue_depth, send_enrich
from core.config import Settings
from enrich.cli import app as cli
from harness.images import png_bytes
from schemas.events import ListingEvent
from tests.worker.conftest import send_png, wait_until
from worker import runtime
from worker.intake import Intake, make_consumer
from worker.store import StoredTag, tags_of, upsert_listings

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture()
def celery_env(use_celery, monkeypatch, pg_url, model_dir, kafka_bootstrap):
    """A real worker in this process; the environment is set too, because tests here also run CLI commands
    (`enrich sweep`) in this process, which read their settings from it as a process start does."""
    queue = f"gpu-test-{uuid.uuid4().hex[:8]}"
    topic = f"listings-{uuid.uuid4().hex[:8]}"
    env = {"ENRICH_DATABASE_URL": pg_url, "ENRICH_MODEL_DIR": str(model_dir), "ENRICH_ALLOW_LOCAL_PATHS": "true",
           "ENRICH_CELERY_BROKER_URL": REDIS, "ENRICH_GPU_QUEUE": queue, "ENRICH_RETRY_BACKOFF_S": "0.2",
           "ENRICH_ALLOWED_HOSTS": '["127.0.0.1"]', "ENRICH_ALLOW_PRIVATE_NETWORKS": "true",
           "ENRICH_KAFKA_BOOTSTRAP": kafka_bootstrap, "ENRICH_LISTINGS_TOPIC": topic,
           "ENRICH_DLQ_TOPIC": topic + ".dlq", "ENRICH_BATCH_SIZE": "4"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings()
    runtime.reset()
    use_celery(settings)
    with start_worker(app, pool="solo", perform_ping_check=False, queues=[queue], shutdown_timeout=30):
        yield settings
    runtime.reset()


def test_kafka_to_rows_through_a_real_celery_worker(celery_env, pg_url, db, tmp_path):
    settings = celery_env
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(png_bytes((40 * i, 100, 200 - 30 * i)))
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    events = [dict(listing_id=f"k{i}", seller_id="s", images=[str(tmp_path / f"{i}.png")]) for i in range(6)]
    events[0]["category"] = "Bag"
    for ev in events + events[:3]:  # three duplicates
        producer.send(settings.listings_topic, key=ev["listing_id"].encode(), value=json.dumps(ev).encode())
    producer.send(settings.listings_topic, key=b"bad", value=b'{"listing_id": "bad"}')
    producer.flush()
    producer.close()

    consumer = make_consumer(settings, settings.listings_topic, "e2e", session_timeout_ms=6000,
                             heartbeat_interval_ms=500)
    intake = Intake(settings, lambda: psycopg.connect(pg_url, autocommit=True), lambda ids: send_enrich(ids, settings),
                    queue_depth=lambda: queue_depth(settings.gpu_queue), consumer=consumer, poll_timeout_ms=200)
    stats = intake.run(max_events=10, idle_exit_s=5)
    assert stats.consumed == 10 and stats.dlq == 1

    done = lambda: db.execute("SELECT count(*) FROM listings WHERE status = 'enriched'").fetchone()[0] == 6  # noqa: E731
    wait_until(done)
    assert db.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 6
    assert db.execute("SELECT count(*) FROM listing_tags").fetchone()[0] == 18  # category, type, colour each
    assert tags_of(db, "k0")["category"] == StoredTag("category", "Bag", "seller", None, None)
    assert tags_of(db, "k1")["category"].source == "predicted"


class _FlakyHandler(BaseHTTPRequestHandler):
    failures_left = 2
    served = 0
    lock = threading.Lock()

    def do_GET(self) -> None:
        with self.lock:
            fail = type(self).failures_left > 0
            type(self).failures_left -= 1
        if fail:
            self.send_response(503)
            self.end_headers()
            return
        type(self).served += 1
        send_png(self, (10, 200, 10))

    def log_message(self, *args) -> None:
        pass


def test_transient_image_host_failure_retried_with_backoff(celery_env, db, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "ok.png").write_bytes(png_bytes())
        (tmp_path / "bad.png").write_bytes(b"not an image at all")
        url = f"http://127.0.0.1:{server.server_address[1]}/img.png"
        with db.transaction():
            upsert_listings(db, [ListingEvent(listing_id="flaky", seller_id="s", images=[url]),
                                 ListingEvent(listing_id="fine", seller_id="s", images=[str(tmp_path / "ok.png")]),
                                 ListingEvent(listing_id="broken", seller_id="s", images=[str(tmp_path / "bad.png")])])
        send_enrich(["flaky", "fine", "broken"], celery_env)
        status = lambda: dict(db.execute("SELECT listing_id, status FROM listings").fetchall())  # noqa: E731
        wait_until(lambda: status() == {"flaky": "enriched", "fine": "enriched", "broken": "failed"})
        assert _FlakyHandler.served == 1  # two 503s, then one success: retried, not failed
        assert "not an image" in db.execute("SELECT error FROM listings WHERE listing_id = 'broken'").fetchone()[0]
        assert tags_of(db, "flaky")["colour"].source == "predicted"
    finally:
        server.shutdown()
        server.server_close()


def test_sweep_enqueues_listings_whose_task_was_lost(celery_env, db, pg_url, tmp_path):
    """A listing written but never enqueued (the broker dropped its task) is picked up by `enrich sweep`;
    one that changed recently is left to its own task."""
    def stale(after_s):
        return [r[0] for r in db.execute("SELECT listing_id FROM listings WHERE status = 'pending' AND "
                                         "updated_at < now() - make_interval(secs => %s)", (after_s,))]

    (tmp_path / "a.png").write_bytes(png_bytes((200, 20, 20)))
    with db.transaction():
        upsert_listings(db, [ListingEvent(listing_id=lid, seller_id="s", images=[str(tmp_path / "a.png")])
                             for lid in ("lost", "fresh")])
        db.execute("UPDATE listings SET updated_at = now() - interval '2 hours' WHERE listing_id = 'lost'")
    assert stale(1800) == ["lost"]
    res = CliRunner().invoke(cli, ["sweep", "--database-url", pg_url])
    assert res.exit_code == 0, res.output
    assert "1 pending listing(s) enqueued again" in res.output
    status = lambda: dict(db.execute("SELECT listing_id, status FROM listings").fetchall())  # noqa: E731
    wait_until(lambda: status()["lost"] == "enriched")
    assert status()["fresh"] == "pending" and stale(1800) == []


def test_beat_runs_the_sweep_on_the_cpu_queue(use_celery):
    use_celery(Settings(cpu_queue="cpu-x"))

    entry = app.conf.beat_schedule["sweep-pending"]
    assert entry["task"] == SWEEP_TASK and SWEEP_TASK in app.tasks
    assert entry["options"]["queue"] == "cpu-x" and entry["schedule"] == 600.0
