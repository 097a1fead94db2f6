"""Workers follow the registry without traffic: an idle worker serves a promotion (or a rollback) within a few
ENRICH_MODEL_CHECK_S, says so in /metrics and worker_status, and its first task runs on the new model; a batch
never mixes versions; cpu and train workers load no model and report themselves all the same."""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import uuid

import pytest
from prometheus_client import REGISTRY

from core.celery_app import send_enrich
from core.config import Settings
from harness.cluster import worker_process_env
from harness.images import png_bytes
from harness.net import free_port, scrape_metrics
from model.artifacts import store_from_settings
from model.registry import promote, register_candidate, rollback
from schemas.events import ListingEvent
from tests.worker.conftest import AMQP, start_worker_process, wait_until
from worker import runtime
from worker.store import upsert_listings

V1, V2 = "test-small-v1", "test-small-v2"




def _served(port: int) -> set[str] | None:
    """The versions /metrics says this worker serves (enrich_model_served at 1)."""
    text = scrape_metrics(port)
    if text is None:
        return None
    return {v for v, value in re.findall(r'^enrich_model_served\{model_version="([^"]+)"\} (\S+)$', text, re.M)
            if float(value) == 1.0}


def _health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def _status(db, queues: str) -> list[tuple]:
    return db.execute("SELECT model_version, shadow_version, seen_at FROM worker_status WHERE queues = %s"
                      " ORDER BY worker", (queues,)).fetchall()


def _register(db, settings, model_dir, version: str) -> None:
    register_candidate(db, model_dir, store_from_settings(settings), actor="test", reason="new weights")
    assert promote(db, version, actor="test", reason="better").promoted


def _enrich_one(db, settings, tmp_path, listing_id: str) -> set[str]:
    """Send one task of one new listing; wait until it is enriched; the model versions of its predicted tags."""
    (tmp_path / "a.png").write_bytes(png_bytes((30, 160, 40)))
    with db.transaction():
        upsert_listings(db, [ListingEvent(listing_id=listing_id, seller_id="s", images=[str(tmp_path / "a.png")])])
    send_enrich([listing_id], settings)
    wait_until(lambda: db.execute("SELECT status FROM listings WHERE listing_id = %s",
                                  (listing_id,)).fetchone()[0] == "enriched")
    return {r[0] for r in db.execute("SELECT model_version FROM listing_tags WHERE listing_id = %s"
                                     " AND source = 'predicted'", (listing_id,)).fetchall()}


@pytest.mark.parametrize("concurrency", [1, 2], ids=["solo", "prefork"])
def test_idle_worker_follows_promotion_and_rollback_with_no_task_sent(db, pg_url, model_dir, model_dir_v2, tmp_path,
                                                                     use_celery, concurrency):
    queue = f"gpu-follow-{uuid.uuid4().hex[:8]}"
    settings = use_celery(Settings(celery_broker_url=AMQP, gpu_queue=queue, data_dir=tmp_path / "data"))
    _register(db, settings, model_dir, V1)
    port = free_port()
    # no ENRICH_MODEL_DIR: the worker serves what the registry marks active
    env = worker_process_env(pg_url, queue, data_dir=tmp_path / "data", model_check_s=0.5, torch_threads=1)
    env.pop("ENRICH_MODEL_DIR", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "worker.log"
    proc = start_worker_process(env, log, "-c", str(concurrency), "--metrics-port", str(port))
    try:
        wait_until(lambda: _served(port) == {V1} or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert _health(port)["checks"]["model"] == "ok"  # a prefork parent answers for its children
        # one row per process that runs tasks (the prefork children), naming its queues
        wait_until(lambda: [r[0] for r in _status(db, queue)] == [V1] * concurrency)

        _register(db, settings, model_dir_v2, V2)  # no task is sent: the worker sees it by itself
        wait_until(lambda: _served(port) == {V2})
        wait_until(lambda: [r[0] for r in _status(db, queue)] == [V2] * concurrency)
        assert _enrich_one(db, settings, tmp_path, "after-promote") == {V2}

        rollback(db, actor="test", reason="worse on live traffic")
        wait_until(lambda: _served(port) == {V1})
        wait_until(lambda: [r[0] for r in _status(db, queue)] == [V1] * concurrency)
        assert _enrich_one(db, settings, tmp_path, "after-rollback") == {V1}
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


@pytest.fixture()
def following_runtime(db, pg_url, model_dir, tmp_path):
    """This process as a registry-following worker (runtime only, no Celery), V1 active; forgotten afterwards."""
    settings = Settings(database_url=pg_url, data_dir=tmp_path / "data", device="cpu", allow_local_paths=True,
                        model_check_s=3600)  # the test runs each registry check itself
    _register(db, settings, model_dir, V1)
    runtime.reset()
    yield settings
    runtime.reset()


def test_a_task_that_starts_while_a_seen_model_loads_waits_for_it(following_runtime, db, model_dir_v2):
    settings = following_runtime
    runtime.task_started()
    assert runtime.enricher(settings).model_version == V1
    runtime.task_finished()
    _register(db, settings, model_dir_v2, V2)
    runtime.check(settings)  # what the timer does: sees V2, starts loading it in the background
    runtime.task_started()
    try:
        assert runtime.enricher(settings).model_version == V2
    finally:
        runtime.task_finished()


def test_a_running_task_keeps_its_model_and_the_switch_follows_its_end(following_runtime, db, model_dir_v2,
                                                                      tmp_path, caplog):
    settings = following_runtime
    (tmp_path / "a.png").write_bytes(png_bytes())
    with db.transaction():
        upsert_listings(db, [ListingEvent(listing_id="held", seller_id="s", images=[str(tmp_path / "a.png")])])
    caplog.set_level("INFO", logger="worker.runtime")
    runtime.task_started()
    try:
        held = runtime.enricher(settings)
        assert held.model_version == V1
        _register(db, settings, model_dir_v2, V2)
        runtime.check(settings)
        wait_until(lambda: any(f"model {V2} loaded" in r.getMessage() for r in caplog.records))
        assert runtime.enricher(settings) is held  # one Enricher for the whole task
        with runtime.pool(settings).connection() as conn:  # and it still works: nobody closed it under the task
            out = held.run(conn, ["held"])
        assert [e.listing_id for e in out.enriched] == ["held"]
        assert REGISTRY.get_sample_value("enrich_model_served", {"model_version": V1}) == 1.0
    finally:
        runtime.task_finished()
    # the task is over: the loaded model is served now, before any other task
    assert REGISTRY.get_sample_value("enrich_model_served", {"model_version": V2}) == 1.0
    assert REGISTRY.get_sample_value("enrich_model_served", {"model_version": V1}) == 0.0
    assert {r[0] for r in db.execute("SELECT model_version FROM listing_tags WHERE listing_id = 'held'")} == {V1}


def test_cpu_and_train_workers_load_no_model_and_report_themselves(db, pg_url, tmp_path):
    tag = uuid.uuid4().hex[:8]
    cpu, train = f"cpu-{tag}", f"train-{tag}"
    # no model is registered at all: a worker that tried to load one would log the failure
    env = worker_process_env(pg_url, f"gpu-{tag}", cpu_queue=cpu, train_queue=train, data_dir=tmp_path / "data",
                             model_check_s=0.5)
    env.pop("ENRICH_MODEL_DIR", None)
    logs = {cpu: tmp_path / "cpu.log", train: tmp_path / "train.log"}
    procs = [start_worker_process(env, logs[cpu], "-Q", cpu, "-c", "2"),
             start_worker_process(env, logs[train], "-Q", train)]
    try:
        def reported() -> bool:
            return len(_status(db, cpu)) == 2 and len(_status(db, train)) == 1

        wait_until(lambda: reported() or any(p.poll() is not None for p in procs))
        assert all(p.poll() is None for p in procs), [log.read_text()[-3000:] for log in logs.values()]
        first = {q: _status(db, q) for q in (cpu, train)}
        assert all(row[:2] == (None, None) for rows in first.values() for row in rows), first
        # the rows are refreshed on the timer, with no task sent
        wait_until(lambda: all(new[2] > old[2] for q in (cpu, train)
                               for old, new in zip(first[q], _status(db, q), strict=True)))
        for log in logs.values():
            text = log.read_text()
            assert "loaded from" not in text and "could not be loaded" not in text, text[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
