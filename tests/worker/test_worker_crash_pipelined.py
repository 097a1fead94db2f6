"""kill -9 of a worker whose task is part written (RabbitMQ broker, real worker processes): after the
redelivery every listing is written, and by exactly one transaction."""
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

LOCAL = [f"a{i}" for i in range(6)]  # images on disk: their forward passes run and commit at once
GATED = [f"b{i}" for i in range(6)]  # images from the gated server: in flight when the worker is killed


def _writers(db, table: str) -> dict[str, set[str]]:
    """listing id → the transactions (xmin) that wrote its current rows in `table`."""
    rows = db.execute(f"SELECT listing_id, xmin::text FROM {table}").fetchall()
    out: dict[str, set[str]] = {}
    for lid, xmin in rows:
        out.setdefault(lid, set()).add(xmin)
    return out


def test_kill_9_with_batches_in_flight_writes_each_listing_once(db, pg_url, model_dir, tmp_path, use_celery):
    server, base = serve_gated(_GateHandler)
    queue = f"gpu-crash-{uuid.uuid4().hex[:6]}"
    env = worker_process_env(pg_url, queue, model_dir=model_dir, batch_size=2)
    log = tmp_path / "worker.log"
    first = start_worker_process(env, log)
    second = None
    try:
        (tmp_path / "local.png").write_bytes(png_bytes())
        with db.transaction():
            upsert_listings(db, [ListingEvent(listing_id=i, seller_id="s", images=[str(tmp_path / "local.png")])
                                 for i in LOCAL] +
                            [ListingEvent(listing_id=i, seller_id="s", images=[f"{base}/{i}.png"]) for i in GATED])

        settings = use_celery(Settings(celery_broker_url=AMQP, gpu_queue=queue))
        send_enrich(LOCAL + GATED, settings)  # one task of 12 listings: 6 forward passes of 2

        def enriched() -> list[str]:
            return [r[0] for r in db.execute("SELECT listing_id FROM listings WHERE status = 'enriched'"
                                             " ORDER BY 1").fetchall()]

        wait_until(lambda: enriched() == LOCAL and _GateHandler.arrived.is_set(), timeout=120)
        before = _writers(db, "embeddings")
        assert len(set().union(*before.values())) == 3  # committed pass by pass, while the task went on
        os.kill(first.pid, signal.SIGKILL)  # gated passes in flight, the task not acknowledged
        first.wait(10)
        assert enriched() == LOCAL
        _GateHandler.gate.set()
        second = start_worker_process(env, log)  # the broker redelivers the whole task
        wait_until(lambda: len(enriched()) == 12)

        embeddings, tags = _writers(db, "embeddings"), _writers(db, "listing_tags")
        assert sorted(embeddings) == sorted(tags) == sorted(LOCAL + GATED)
        assert all(len(x) == 1 for x in embeddings.values())
        assert {i: embeddings[i] for i in LOCAL} == before  # the redelivered task skipped what was committed
        assert all(tags[i] == embeddings[i] for i in embeddings)  # a listing's rows: one transaction
        assert db.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 12
        assert db.execute("SELECT count(*) FROM listing_tags").fetchone()[0] == 36
        # the task's summary line is logged after its last commit
        wait_until(lambda: "6 enriched, 0 failed, 6 skipped" in log.read_text())
    finally:
        stop_all((first, second), server)
