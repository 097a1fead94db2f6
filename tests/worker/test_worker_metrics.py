"""/metrics of a prefork worker (`enrich worker -c 2`) counts what its child processes did."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import pytest

from schemas.events import ListingEvent
from tests.net import free_port, scrape_metrics
from tests.worker.conftest import AMQP, ROOT, png_bytes, wait_until
from worker.store import upsert_listings

pytestmark = pytest.mark.integration





def _enriched(text: str | None) -> float:
    m = text and re.search(r'^enrich_listings_total\{outcome="enriched"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_prefork_worker_metrics_sum_its_children(db, pg_url, model_dir, tmp_path, use_celery):
    queue = f"gpu-metrics-{uuid.uuid4().hex[:6]}"
    port = free_port()
    env = {**os.environ, "ENRICH_DATABASE_URL": pg_url, "ENRICH_MODEL_DIR": str(model_dir),
           "ENRICH_CELERY_BROKER_URL": AMQP, "ENRICH_GPU_QUEUE": queue, "ENRICH_ALLOW_LOCAL_PATHS": "true",
           "ENRICH_DEVICE": "cpu", "ENRICH_TORCH_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "enrich.cli", "worker", "-c", "2", "--metrics-port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("a"))
    try:
        wait_until(lambda: scrape_metrics(port) is not None or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert _enriched(scrape_metrics(port)) == 0.0
        (tmp_path / "a.png").write_bytes(png_bytes())
        ids = [f"m{i}" for i in range(3)]
        with db.transaction():
            upsert_listings(db, [ListingEvent(listing_id=i, seller_id="s", images=[str(tmp_path / "a.png")])
                                 for i in ids])
        from core.celery_app import send_enrich
        from core.config import Settings

        settings = use_celery(Settings(celery_broker_url=AMQP, gpu_queue=queue))
        for i in ids:  # one task each: both children get work
            send_enrich([i], settings)
        wait_until(lambda: db.execute("SELECT count(*) FROM listings WHERE status = 'enriched'").fetchone()[0] == 3)
        # the parent process enriched nothing itself: these counts come from the children's files
        wait_until(lambda: _enriched(scrape_metrics(port)) == 3.0)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
