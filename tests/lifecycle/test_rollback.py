"""Rolling back a worse model end to end on real parts (Postgres, a Redis broker, one real Celery worker serving
whatever the registry marks active, real small models): the worse model is promoted through the CLI, re-tags the
catalogue and tags new listings; `enrich rollback` makes the earlier model active again and its backfill leaves
nothing the worse model wrote: no predicted tag, no open review item, no shelf it computed."""
from __future__ import annotations

import uuid
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
from model.registry import promote, register_candidate
from schemas.events import CorrectionEvent
from similar.common import shelf_model_version
from similar.nightly import recompute
from similar.query import read_neighbours
from tests.lifecycle.conftest import enrich_via_worker as _enrich
from tests.worker.conftest import wait_until
from worker import backfill, runtime
from worker.store import record_correction

BROKER = "redis://127.0.0.1:6379/0"
GOOD, BAD = "good", "worse"


@pytest.fixture()
def worker(use_celery, monkeypatch, pg_url, db, tmp_path):
    """A worker on queues of this test's own, serving the registry's active model (GOOD, promoted here)."""
    tag = uuid.uuid4().hex[:8]
    env = {"ENRICH_DATABASE_URL": pg_url, "ENRICH_DATA_DIR": str(tmp_path / "data"), "ENRICH_MODEL_CHECK_S": "0.2",
           "ENRICH_ALLOW_LOCAL_PATHS": "true", "ENRICH_CELERY_BROKER_URL": BROKER, "ENRICH_DEVICE": "cpu",
           "ENRICH_GPU_QUEUE": f"gpu-rb-{tag}", "ENRICH_BACKFILL_QUEUE": f"backfill-rb-{tag}",
           "ENRICH_CPU_QUEUE": f"cpu-rb-{tag}", "ENRICH_TRAIN_QUEUE": f"train-rb-{tag}",
           "ENRICH_BACKFILL_PAUSE_S": "0.2", "ENRICH_TASK_LISTINGS": "4", "ENRICH_SIMILAR_K": "3", "COLUMNS": "200"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings()
    # the gate's stored figure: GOOD 0.3, BAD 0.1 (save_small_model scores seed n at 0.1 * (n + 1))
    register_candidate(db, save_small_model(tmp_path / GOOD, GOOD, seed=2, colour_threshold=1.0),
                       store_from_settings(settings), actor="test", reason="the model in service")
    promote(db, GOOD, actor="test", reason="the model in service")
    runtime.reset()
    backfill.reset()
    use_celery(settings)
    queues = [settings.gpu_queue, settings.backfill_queue, settings.cpu_queue]
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False, queues=queues, shutdown_timeout=60):
            yield settings
    finally:
        runtime.reset()
        backfill.reset()
        with Connection(BROKER) as conn:
            for q in queues:
                try:
                    conn.default_channel.queue_delete(q)
                except Exception:
                    pass


def _rows_of(db, version: str) -> tuple[int, int]:
    """(predicted tags, open review items) the version wrote that are still there."""
    return db.execute(
        "SELECT (SELECT count(*) FROM listing_tags WHERE source = 'predicted' AND model_version = %s),"
        " (SELECT count(*) FROM review_queue WHERE resolved_at IS NULL AND model_version = %s)",
        (version, version)).fetchone()


def _kept_tags(db) -> set[tuple]:
    return set(db.execute("SELECT listing_id, tag_group, value, source FROM listing_tags WHERE source <> 'predicted'"
                          ).fetchall())


def _shelf_version(db, model_version: str) -> int | None:
    row = db.execute("SELECT version FROM similar_items_active WHERE model_version = %s", (model_version,)).fetchone()
    return row[0] if row else None


def _backfill(db, model_version: str) -> str | None:
    row = db.execute("SELECT status FROM backfills WHERE model_version = %s", (model_version,)).fetchone()
    return row[0] if row else None


def test_enrich_rollback_leaves_nothing_the_worse_model_wrote(worker, db, tmp_path):
    settings, cli = worker, CliRunner()
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes((200, 30, 30), size=(64, 64)))
    catalogue = [f"item-{i:02d}" for i in range(10)]
    _enrich(db, settings, catalogue[:1], image, category="Bag")  # the seller said what it is
    _enrich(db, settings, catalogue[1:], image)
    record_correction(db, CorrectionEvent(event_id="c1", listing_id=catalogue[1], group="category", new_value="Shirt",
                                          corrected_by="reviewer", corrected_at=datetime.now(UTC)))
    recompute(db, GOOD, k=3, settings=settings)
    kept, good_shelves = _kept_tags(db), _shelf_version(db, GOOD)

    # an admin overrides the gate for a worse model; its backfill re-tags the catalogue, its reindex switches shelves
    res = cli.invoke(app, ["promote", str(save_small_model(tmp_path / BAD, BAD, seed=0, colour_threshold=1.0)),
                           "--tolerance", "1", "--reason", "looks fine", "--by", "bob"])
    assert res.exit_code == 0, res.output
    wait_until(lambda: _backfill(db, BAD) == "done", timeout=180)
    wait_until(lambda: shelf_model_version(db) == BAD, timeout=120)
    _enrich(db, settings, ["fresh-1", "fresh-2"], image)  # live listings: only the worse model ever saw them
    assert all(_rows_of(db, BAD))  # it wrote predicted tags and open review items

    res = cli.invoke(app, ["rollback", "--reason", "category accuracy 0.83 vs 0.97", "--by", "carol"])
    assert res.exit_code == 0, res.output
    assert f"backfill of {GOOD} enqueued" in res.output
    assert shelf_model_version(db) == GOOD and _shelf_version(db, GOOD) == good_shelves  # kept shelves, at once
    wait_until(lambda: _backfill(db, GOOD) == "done", timeout=180)

    assert _rows_of(db, BAD) == (0, 0)
    assert all(_rows_of(db, GOOD))
    assert dict(db.execute("SELECT listing_id, enriched_by FROM listings").fetchall()) == \
        dict.fromkeys(catalogue + ["fresh-1", "fresh-2"], GOOD)
    assert _kept_tags(db) == kept
    assert db.execute("SELECT total, done FROM backfills WHERE model_version = %s", (GOOD,)).fetchone() == (12, 12)

    # the reindex the backfill sent builds the restored model's shelves, the listings it never saw included
    wait_until(lambda: _shelf_version(db, GOOD) != good_shelves, timeout=120)
    assert shelf_model_version(db) == GOOD
    for lid in ("fresh-1", "item-05"):
        neighbours, source = read_neighbours(db, lid)
        assert source == "nightly" and len(neighbours) == 3
    assert db.execute("SELECT count(*) FROM similar_items_current c WHERE c.model_version = %s"
                      " AND c.listing_id = 'fresh-1'", (GOOD,)).fetchone()[0] == 1
