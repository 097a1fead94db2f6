"""The model lifecycle end to end on real parts (Postgres, a Redis broker, one real Celery worker, FMNIST-shop
with the tiny preset): corrections → retrain job → gate → promote → the running worker switches → the backfill
re-embeds and re-tags only predicted tags → the new model's shelves switch in → rollback restores the old
version everywhere, its shelves at once."""
from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from celery.contrib.testing.worker import start_worker
from kombu import Connection
from typer.testing import CliRunner

from core.celery_app import app as celery_app
from core.config import Settings
from enrich.cli import app
from harness.images import png_bytes
from harness.models import save_small_model
from model.artifacts import store_from_settings
from model.registry import active_version, promote, register_candidate
from schemas.events import CorrectionEvent
from similar.common import shelf_model_version
from similar.nightly import recompute
from similar.query import read_neighbours
from tests.lifecycle.conftest import enrich_via_worker as _enrich
from tests.worker.conftest import wait_until
from worker import backfill, runtime
from worker.store import record_correction, tags_of

BROKER = "redis://127.0.0.1:6379/5"  # a database of its own: the train, backfill and cpu queue names are fixed


@pytest.fixture()
def lifecycle(use_celery, monkeypatch, pg_url, db, fmnist_dir, tmp_path):
    """A worker serving whatever the registry marks active, on every queue (gpu, backfill, train, cpu)."""
    env = {"ENRICH_DATABASE_URL": pg_url, "ENRICH_DATA_DIR": str(tmp_path / "data"), "ENRICH_MODEL_CHECK_S": "0.2",
           "ENRICH_ALLOW_LOCAL_PATHS": "true", "ENRICH_CELERY_BROKER_URL": BROKER, "ENRICH_GPU_QUEUE": "gpu-e2e",
           "ENRICH_DEVICE": "cpu", "ENRICH_BACKFILL_PAUSE_S": "0.2", "ENRICH_RETRAIN_PRESET": "tiny",
           "ENRICH_RETRAIN_DATA_DIR": str(fmnist_dir), "ENRICH_SIMILAR_K": "5", "COLUMNS": "200",
           "ENRICH_GATE_TOLERANCE": "1"}  # a 9-step model against a random one: the gate judges no merit here
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with Connection(BROKER) as conn:
        conn.default_channel.client.flushdb()
    settings = Settings()
    register_candidate(db, save_small_model(tmp_path / "base", "base", seed=0), store_from_settings(settings),
                       actor="test", reason="the model in service")
    promote(db, "base", actor="test", reason="the model in service")
    runtime.reset()
    backfill.reset()
    use_celery(settings)
    queues = [settings.gpu_queue, settings.backfill_queue, settings.train_queue, settings.cpu_queue]
    with start_worker(celery_app, pool="solo", perform_ping_check=False, queues=queues, shutdown_timeout=60):
        yield settings
    runtime.reset()
    with Connection(BROKER) as conn:
        conn.default_channel.client.flushdb()


def _embedded_under(db, ids) -> set[str]:
    return {r[0] for r in db.execute("SELECT model_version FROM embeddings WHERE listing_id = ANY(%s)"
                                     " AND model_version IN (SELECT model_version FROM models WHERE status = 'active')",
                                     (ids,)).fetchall()}


def test_corrections_retrain_promote_backfill_shelves_and_rollback(lifecycle, db, tmp_path):
    settings, cli = lifecycle, CliRunner()
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes((200, 30, 30), size=(64, 64)))
    catalogue = [f"item-{i:02d}" for i in range(12)]
    _enrich(db, settings, catalogue[:1], image, category="Bag")  # the seller said what it is
    _enrich(db, settings, catalogue[1:], image)
    recompute(db, "base", k=5, settings=settings)
    assert shelf_model_version(db) == "base"

    # people correct the confused pair; the admin asks for a retrain
    now = datetime.now(UTC)
    for i, value in ((1, "Shirt"), (2, "T-shirt/top")):
        record_correction(db, CorrectionEvent(event_id=f"c{i}", listing_id=catalogue[i], group="category",
                                              new_value=value, corrected_by="reviewer", corrected_at=now))
    res = cli.invoke(app, ["retrain", "--reason", "shirts vs t-shirts", "--by", "alice", "--fresh", "--wait"])
    assert res.exit_code == 1 and "not promoted" in res.output, res.output  # it waits for an admin
    job = db.execute("SELECT status, model_version, outcome FROM training_jobs").fetchone()
    assert job[0] == "done" and job[2].startswith("waiting for an admin"), job
    candidate = job[1]

    # the admin promotes it, both measured on one set (a 9-step model against a random one: no merit test here)
    res = cli.invoke(app, ["promote", candidate, "--reevaluate", "--tolerance", "1", "--reason", "reviewed", "--by",
                           "bob"])
    assert res.exit_code == 0, res.output
    wait_until(lambda: db.execute("SELECT status FROM backfills WHERE model_version = %s",
                                  (candidate,)).fetchone() == ("done",), timeout=180)
    assert _embedded_under(db, catalogue) == {candidate}
    assert db.execute("SELECT count(*) FROM embeddings WHERE model_version = %s", (candidate,)).fetchone()[0] == 12
    # every prediction now comes from the new model: tags it is sure of, review items (re-scored) where not
    made_by = db.execute("SELECT model_version FROM listing_tags WHERE source = 'predicted' UNION SELECT"
                         " model_version FROM review_queue WHERE resolved_at IS NULL").fetchall()
    assert made_by == [(candidate,)]
    for listing, value, source in ((catalogue[0], "Bag", "seller"), (catalogue[1], "Shirt", "corrected"),
                                   (catalogue[2], "T-shirt/top", "corrected")):
        tag = tags_of(db, listing)["category"]
        assert (tag.value, tag.source) == (value, source), listing
    wait_until(lambda: shelf_model_version(db) == candidate, timeout=120)  # the reindex switched the shelves
    neighbours, source = read_neighbours(db, catalogue[3])
    assert source == "nightly" and len(neighbours) == 5

    # a new listing is served by the new model in the same, never restarted, worker
    _enrich(db, settings, ["fresh-1"], image)
    assert _embedded_under(db, ["fresh-1"]) == {candidate}

    # rollback: the old model is active again and its kept shelves serve at once
    res = cli.invoke(app, ["rollback", "--reason", "shelves look off", "--by", "carol"])
    assert res.exit_code == 0, res.output
    assert active_version(db) == "base" and shelf_model_version(db) == "base"
    time.sleep(0.5)  # past the worker's registry check interval
    _enrich(db, settings, ["fresh-2"], image)
    assert _embedded_under(db, ["fresh-2"]) == {"base"}
