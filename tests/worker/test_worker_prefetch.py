"""A one-process (solo) `enrich worker` holds the next task while it runs one, so a backlog drains back to back
instead of one task per tick of Celery's 2 s event-loop timer (RabbitMQ broker, a real worker process)."""
from __future__ import annotations

import uuid

from core.celery_app import send_enrich
from core.config import Settings
from harness.cluster import queue_depth, worker_process_env
from schemas.events import ListingEvent
from tests.worker.conftest import AMQP, gate_handler, serve_gated, start_worker_process, stop_all, wait_until
from worker.store import upsert_listings

_GateHandler = gate_handler()
_GateHandler.hold.set()  # every image request waits for the gate

TASKS = 5


def test_a_solo_worker_holds_the_next_task_while_it_runs_one(db, pg_url, model_dir, tmp_path, use_celery):
    server, base = serve_gated(_GateHandler)
    queue = f"gpu-prefetch-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "worker.log"
    proc = start_worker_process(worker_process_env(pg_url, queue, model_dir=model_dir), log)
    try:
        ids = [f"held-{i}" for i in range(TASKS)]
        with db.transaction():
            upsert_listings(db, [ListingEvent(listing_id=lid, seller_id="s", images=[f"{base}/{lid}.png"])
                                 for lid in ids])

        settings = use_celery(Settings(celery_broker_url=AMQP, gpu_queue=queue))
        for lid in ids:
            send_enrich([lid], settings)
        assert _GateHandler.arrived.wait(120), log.read_text()[-3000:]  # the first task waits on its image
        # the running task and the next one are with the worker; the rest wait in RabbitMQ
        wait_until(lambda: queue_depth(AMQP, queue) == TASKS - 2)
        _GateHandler.gate.set()
        wait_until(lambda: db.execute("SELECT count(*) FROM listings WHERE status = 'enriched'").fetchone()[0]
                   == TASKS)
    finally:
        stop_all((proc,), server)
