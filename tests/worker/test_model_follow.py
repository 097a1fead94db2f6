"""A running worker follows the registry: a promoted model is served from a later batch (never mid-batch), a
shadow candidate predicts apart and is measured against later corrections."""
from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from celery.contrib.testing.worker import start_worker

from core.celery_app import app, send_enrich
from core.config import Settings
from harness.images import png_bytes
from model.artifacts import store_from_settings
from model.registry import active_model, promote, register_candidate, set_shadow
from model.shadow import shadow_report
from schemas.events import CorrectionEvent, ListingEvent
from tests.worker.conftest import wait_until
from training import gate
from worker import runtime
from worker.store import record_correction, upsert_listings

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture()
def following_worker(use_celery, monkeypatch, pg_url, db, model_dir, tmp_path):
    """A real Celery worker with no ENRICH_MODEL_DIR: it serves whatever the registry marks active."""
    env = {"ENRICH_DATABASE_URL": pg_url, "ENRICH_DATA_DIR": str(tmp_path / "data"), "ENRICH_MODEL_CHECK_S": "0.2",
           "ENRICH_ALLOW_LOCAL_PATHS": "true", "ENRICH_CELERY_BROKER_URL": REDIS,
           "ENRICH_GPU_QUEUE": f"gpu-follow-{uuid.uuid4().hex[:8]}", "ENRICH_DEVICE": "cpu", "ENRICH_BATCH_SIZE": "2",
           "ENRICH_SHADOW_SHARE": "1.0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings()
    register_candidate(db, model_dir, store_from_settings(settings), actor="test", reason="first")
    promote(db, "test-small-v1", actor="test", reason="first")
    runtime.reset()
    use_celery(settings)
    with start_worker(app, pool="solo", perform_ping_check=False, queues=[settings.gpu_queue], shutdown_timeout=30):
        yield settings
    runtime.reset()


def _versions_of(db, ids: list[str]) -> set[str]:
    rows = db.execute("SELECT model_version FROM embeddings WHERE listing_id = ANY(%s)"
                      " UNION SELECT model_version FROM listing_tags"
                      " WHERE listing_id = ANY(%s) AND source = 'predicted'"
                      " UNION SELECT model_version FROM review_queue WHERE listing_id = ANY(%s)",
                      (ids, ids, ids)).fetchall()
    return {r[0] for r in rows}


@pytest.fixture()
def run_batch(following_worker, db, tmp_path):
    """Send one task of four new listings and wait until they are enriched; returns their ids."""
    (tmp_path / "a.png").write_bytes(png_bytes((30, 160, 40)))
    batches: list[list[str]] = []

    def run() -> list[str]:
        ids = [f"b{len(batches)}-{i}" for i in range(4)]  # two forward passes of 2 images each
        with db.transaction():
            upsert_listings(db, [ListingEvent(listing_id=i, seller_id="s", images=[str(tmp_path / "a.png")])
                                 for i in ids])
        send_enrich(ids, following_worker)
        wait_until(lambda: db.execute("SELECT count(*) FROM listings WHERE listing_id = ANY(%s) AND status = "
                                      "'enriched'", (ids,)).fetchone()[0] == len(ids))
        batches.append(ids)
        return ids

    run.batches = batches
    return run


def test_promotion_reaches_a_running_worker_between_batches(following_worker, run_batch, db, model_dir_v2):
    settings = following_worker
    batches = run_batch.batches

    assert _versions_of(db, run_batch()) == {"test-small-v1"}
    register_candidate(db, model_dir_v2, store_from_settings(settings), actor="test", reason="better")
    assert promote(db, "test-small-v2", actor="test", reason="better").promoted
    for _ in range(40):  # the worker checks every 0.2 s and loads in the background
        if _versions_of(db, run_batch()) == {"test-small-v2"}:
            break
    served = [_versions_of(db, ids) for ids in batches]
    assert all(len(v) == 1 for v in served), served  # no batch mixes versions
    first_new = served.index({"test-small-v2"})
    assert all(v == {"test-small-v1"} for v in served[:first_new])
    assert first_new >= 1 and len(served) == first_new + 1
    run_batch()
    assert _versions_of(db, batches[-1]) == {"test-small-v2"}  # and it stays on the new one


def test_shadow_candidate_predicts_apart_and_meets_the_gate_only_with_corrections(following_worker, run_batch, db,
                                                                                 model_dir_v2):
    register_candidate(db, model_dir_v2, store_from_settings(following_worker), actor="test", reason="try it")
    set_shadow(db, "test-small-v2", actor="test", reason="watch it on live traffic")
    for _ in range(40):  # the worker picks the shadow up at its next registry check
        ids = run_batch()
        if db.execute("SELECT count(*) FROM shadow_predictions WHERE listing_id = ANY(%s)", (ids,)).fetchone()[0]:
            break
    assert _versions_of(db, ids) == {"test-small-v1"}  # the shadow never writes tags, reviews or embeddings
    shadow = dict(db.execute("SELECT tag_group, value FROM shadow_predictions WHERE listing_id = %s",
                             (ids[0],)).fetchall())
    assert set(shadow) == {"category", "type", "colour"}

    # the gate with shadow figures refuses while no correction has come in
    decision = gate.promote(db, "test-small-v2", following_worker, actor="test", reason="x", shadow_min_corrections=1)
    assert not decision.promoted and "corrections since the shadow run" in decision.reasons[0]
    db.execute("UPDATE models SET status = 'shadow' WHERE model_version = 'test-small-v2'")  # back in shadow

    # a person confirms what the shadow said: the candidate was right there, at least as often as the active
    now = datetime.now(UTC)
    for i, lid in enumerate(ids):
        record_correction(db, CorrectionEvent(event_id=f"c{i}", listing_id=lid, group="category",
                                              new_value=shadow["category"], corrected_by="reviewer",
                                              corrected_at=now))
    report = shadow_report(db, "test-small-v2")
    assert report.corrections == len(ids) and report.candidate_accuracy == 1.0
    assert report.active_accuracy <= report.candidate_accuracy
    assert gate.promote(db, "test-small-v2", following_worker, actor="test", reason="won in shadow",
                   shadow_min_corrections=len(ids)).promoted
    assert active_model(db).model_version == "test-small-v2"
