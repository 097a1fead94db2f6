"""kill -9 of a worker mid-batch (RabbitMQ broker, real worker processes): nothing lost, nothing twice."""
from __future__ import annotations

import os
import signal
import uuid

from core.celery_app import send_enrich
from core.config import Settings
from harness.cluster import worker_process_env
from harness.images import png_bytes
from schemas.events import ListingEvent
from tests.worker.conftest import AMQP, gate_handler, serve_gated, start_worker_process, stop_all, wait_until
from worker.store import upsert_listings

_GateHandler = gate_handler()
_GateHandler.hold.set()  # every image request waits for the gate


def test_kill_9_mid_batch_redelivers_and_writes_once(db, pg_url, model_dir, tmp_path, use_celery):
    server, base = serve_gated(_GateHandler)
    queue = f"gpu-crash-{uuid.uuid4().hex[:6]}"
    env = worker_process_env(pg_url, queue, model_dir=model_dir)
    log = tmp_path / "worker.log"
    first = start_worker_process(env, log)
    second = None
    try:
        (tmp_path / "local.png").write_bytes(png_bytes())
        with db.transaction():
            upsert_listings(db, [
                ListingEvent(listing_id="slow", seller_id="s", images=[f"{base}/a.png"]),
                ListingEvent(listing_id="quick", seller_id="s", images=[str(tmp_path / "local.png")])])

        settings = use_celery(Settings(celery_broker_url=AMQP, gpu_queue=queue))
        send_enrich(["quick", "slow"], settings)
        assert _GateHandler.arrived.wait(120), log.read_text()[-3000:]
        os.kill(first.pid, signal.SIGKILL)  # mid-batch: images being fetched, nothing written, nothing acked
        first.wait(10)
        assert db.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 0
        _GateHandler.gate.set()
        second = start_worker_process(env, log)
        wait_until(lambda: db.execute("SELECT count(*) FROM listings WHERE status = 'enriched'").fetchone()[0] == 2)
        assert db.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 2
        assert db.execute("SELECT count(*) FROM listing_tags").fetchone()[0] == 6
    finally:
        stop_all((first, second), server)
