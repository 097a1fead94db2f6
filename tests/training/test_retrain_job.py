"""Retraining as a job: real Postgres, a real Celery worker on a Redis broker (queues of the test's own), the
tiny preset on Fashion-MNIST. Corrections → `enrich retrain` → train, evaluate, register, gate, promote or
wait → backfill message; beat's tick skips with a reason; one job trains at a time."""
from __future__ import annotations

import json
import threading
import time
import uuid

import numpy as np
import psycopg
import pytest
from celery.contrib.testing.worker import start_worker
from PIL import Image
from typer.testing import CliRunner

import training.tasks
from core.celery_app import BACKFILL_TASK, app, configure, queue_depth
from core.config import Settings
from enrich.cli import app as cli
from harness.net import take_queued_tasks
from model.registry import active_version, get_model, promote, register_candidate
from training import jobs
from training.fmnist import load_fashion_mnist
from training.tasks import RETRAIN_SCHEDULED_TASK

REDIS = "redis://127.0.0.1:6379/0"


def wait_until(predicate, timeout: float = 90.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached")


@pytest.fixture()
def queues(monkeypatch):
    """Queue names of this test only (the Redis broker is shared), set as a process start reads them."""
    names = {"train": f"train-test-{uuid.uuid4().hex[:8]}", "backfill": f"backfill-test-{uuid.uuid4().hex[:8]}"}
    monkeypatch.setenv("ENRICH_TRAIN_QUEUE", names["train"])
    monkeypatch.setenv("ENRICH_BACKFILL_QUEUE", names["backfill"])
    return names


@pytest.fixture()
def env(monkeypatch, pg_url, fmnist_dir, tmp_path, db, queues):
    """The environment a train worker and `enrich retrain` read (as a process start does); returns a setter."""
    db.execute("TRUNCATE training_jobs, model_events CASCADE")
    base = {"ENRICH_DATABASE_URL": pg_url, "ENRICH_CELERY_BROKER_URL": REDIS, "ENRICH_DATA_DIR": str(tmp_path / "data"),
            "ENRICH_RETRAIN_PRESET": "tiny", "ENRICH_RETRAIN_DATA_DIR": str(fmnist_dir), "ENRICH_DEVICE": "cpu",
            "ENRICH_TORCH_THREADS": "1", "ENRICH_ALLOW_LOCAL_PATHS": "true", "ENRICH_AUTO_PROMOTE": "false"}

    def use(**overrides) -> Settings:
        for k, v in {**base, **overrides}.items():
            monkeypatch.setenv(k, v)
        return Settings()
    return use


@pytest.fixture()
def train_worker(monkeypatch, queues):
    """A real Celery worker in this process serving the test's train queue (the train role: training.tasks)."""
    monkeypatch.setattr(training.tasks, "LOCK_RETRY_S", 0.3)
    include = app.conf.include
    app.conf.include = ("training.tasks",)  # the modules this role needs

    def start(settings: Settings):
        configure(settings)
        return start_worker(app, pool="solo", perform_ping_check=False, queues=[queues["train"]],
                            shutdown_timeout=60)
    yield start
    app.conf.include = include
    configure(Settings())


def _store_corrections(db, fmnist_dir, tmp_path, n_per_class: int = 3, skip: int = 0) -> int:
    """Listings of shirts tagged as T-shirts and the reverse, corrected to the truth (photos: real test images)."""
    x, y = load_fashion_mnist(fmnist_dir, "test")
    count = 0
    for truth, label in ((6, "Shirt"), (0, "T-shirt/top")):
        for i in np.flatnonzero(y == truth)[skip:skip + n_per_class]:
            lid = f"corr-{truth}-{i}"
            path = tmp_path / f"{lid}.png"
            Image.fromarray(x[i]).convert("RGB").resize((56, 56)).save(path)
            db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash) VALUES (%s, 's', %s, 'h')",
                       (lid, json.dumps({"images": [str(path)]})))
            db.execute("INSERT INTO corrections (event_id, listing_id, tag_group, old_value, new_value, corrected_by,"
                       " corrected_at) VALUES (%s, %s, 'category', %s, %s, 'reviewer', now())",
                       (f"e-{lid}", lid, "T-shirt/top" if truth == 6 else "Shirt", label))
            count += 1
    return count


def test_admin_retrain_runs_the_chain_promotes_and_sends_the_backfill(env, train_worker, queues, db, fmnist_dir,
                                                                      tmp_path):

    n = _store_corrections(db, fmnist_dir, tmp_path)
    settings = env(ENRICH_AUTO_PROMOTE="true", ENRICH_CORRECTIONS_HOLDOUT="0")  # every correction trains
    with train_worker(settings):
        res = CliRunner().invoke(cli, ["retrain", "--reason", "shirts fixed by reviewers", "--by", "alice", "--wait"])
    assert res.exit_code == 0, res.output
    assert "queued on" in res.output and " running (admin, alice: shirts fixed by reviewers)" in res.output
    job = jobs.job_progress(db)[0]
    assert (job["status"], job["trigger"], job["requested_by"]) == ("done", "admin", "alice")
    version = job["model_version"]
    assert job["outcome"] == f"promoted {version} (previous: none); catalogue backfill enqueued"
    assert f"#{job['id']} done" in res.output and job["summary"] in res.output
    p = job["progress"]
    assert p["stage"] == "done" and p["corrections"] == n and p["correction_rows"] == n
    assert p["warm_start"] == "fresh weights: no active model" and p["preset"] == "tiny"
    assert set(p["metrics"]) == {version} and "test/top1" in p["metrics"][version]
    row = get_model(db, version)  # registered in the artifact store, who and why from the job, then promoted
    assert row.status == "active" and row.registered_by == "alice" and row.artifact_uri
    assert row.reason == f"retraining job #{job['id']}: shirts fixed by reviewers"
    report = json.loads((settings.models_dir / version / "report" / "metrics.json").read_text())
    assert report["config"]["extra_training_rows"] == n  # the corrected listings were trained on
    assert queue_depth(queues["backfill"]) == 1
    assert take_queued_tasks(queues["backfill"]) == [{"task": BACKFILL_TASK, "args": [version], "kwargs": {}}]


def test_a_second_job_waits_for_the_lock_then_warm_starts_and_waits_for_an_admin(env, train_worker, queues, db,
                                                                                   pg_url, tiny_model_dir):

    register_candidate(db, tiny_model_dir)
    promote(db, "tiny-test")
    # ENRICH_AUTO_PROMOTE=false; a 9-step model must not be judged on merit here (the gate: test_gate*.py)
    settings = env(ENRICH_GATE_TOLERANCE="1")
    holder = psycopg.connect(pg_url, autocommit=True)  # another job is training (its session holds the lock)
    holder.execute("SELECT pg_advisory_lock(%s)", (jobs.LOCK_KEY,))
    try:
        with train_worker(settings):
            job_id = jobs.request_retrain(db, requested_by="bob", reason="weekly")
            wait_until(lambda: jobs.get_job(db, job_id)["progress"].get("stage") == "waiting for the lock", timeout=30)
            time.sleep(1.0)  # several retries later: still queued, nothing trained or registered
            assert jobs.get_job(db, job_id)["status"] == "queued"
            assert db.execute("SELECT count(*) FROM models").fetchone()[0] == 1
            released = holder.execute("SELECT clock_timestamp()").fetchone()[0]
            holder.execute("SELECT pg_advisory_unlock(%s)", (jobs.LOCK_KEY,))
            job = wait_until(lambda: (j := jobs.get_job(db, job_id))["status"] in jobs.FINISHED and j)
    finally:
        holder.close()
    assert job["status"] == "done", job["outcome"]
    assert job["started_at"] >= released  # it began only once the lock was free
    version = job["model_version"]
    assert job["outcome"] == f"waiting for an admin: enrich promote {version} (passes the gate against tiny-test)"
    assert job["progress"]["warm_start"] == "from tiny-test"
    assert set(job["progress"]["metrics"]) == {version, "tiny-test"}  # both measured on the one evaluation set
    assert get_model(db, version).status == "candidate" and active_version(db) == "tiny-test"
    assert queue_depth(queues["backfill"]) == 0


def test_two_jobs_never_train_at_once(db, pg_url, tmp_path):
    """Two workers get a job each at the same moment: the second trains only after the first has finished."""
    db.execute("TRUNCATE training_jobs CASCADE")
    settings = Settings(data_dir=tmp_path, retrain_preset="tiny")
    spans, lock = [], threading.Lock()

    def fake_train(cfg, extra, progress):
        start = time.monotonic()
        progress({"stage": "1-retrieval", "step": 0, "of": 3})
        time.sleep(0.8)
        with lock:
            spans.append((start, time.monotonic()))
        raise RuntimeError("out of memory (simulated)")

    def worker(job_id):  # what the Celery task does: run, and on JobBusy try again later
        while True:
            try:
                return jobs.run_job(pg_url, job_id, settings, train_model=fake_train)
            except jobs.JobBusy:
                time.sleep(0.1)
            except RuntimeError:
                return None

    ids = [jobs.create_job(db, trigger="admin", requested_by="ops", reason=f"r{i}") for i in range(2)]
    threads = [threading.Thread(target=worker, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0  # never at the same time
    for job_id in ids:  # a failure marks the job failed with the error, at the stage it reached
        job = jobs.get_job(db, job_id)
        assert job["status"] == "failed" and job["outcome"] == "failed: RuntimeError: out of memory (simulated)"
        assert job["progress"]["stage"] == "failed at 1-retrieval" and job["finished_at"] is not None


def test_scheduled_retrain_skips_with_a_reason_until_enough_corrections(env, train_worker, queues, db, fmnist_dir,
                                                                        tmp_path):

    _store_corrections(db, fmnist_dir, tmp_path, n_per_class=1)
    settings = env(ENRICH_RETRAIN_MIN_CORRECTIONS="5")
    with train_worker(settings):  # beat's message, through the real worker
        app.send_task(RETRAIN_SCHEDULED_TASK, queue=queues["train"])
        job = wait_until(lambda: (rows := jobs.job_progress(db)) and rows[0])
    assert (job["status"], job["trigger"], job["requested_by"]) == ("skipped", "schedule", "schedule")
    assert job["outcome"] == ("skipped: 2 correction(s) in all (no job has trained yet), fewer than 5 "
                              "(ENRICH_RETRAIN_MIN_CORRECTIONS)")
    assert job["finished_at"] is not None and job["summary"].endswith(job["outcome"])

    # a job whose worker died (running, nobody holds the lock) does not block the schedule for ever
    dead = jobs.create_job(db, trigger="admin", requested_by="ops", reason="crashed")
    db.execute("UPDATE training_jobs SET status = 'running', started_at = now() WHERE id = %s", (dead,))
    _store_corrections(db, fmnist_dir, tmp_path, n_per_class=2, skip=1)  # 4 more: 6 corrections now
    sent = []
    tick = jobs.schedule_retrain(db, settings, send=sent.append)
    assert jobs.get_job(db, dead)["status"] == "failed"
    assert "worker stopped" in jobs.get_job(db, dead)["outcome"]
    assert tick["status"] == "queued" and sent == [tick["job"]]
    assert jobs.get_job(db, tick["job"])["reason"].startswith("6 correction(s) in all")
    # while it is queued, the next tick does not add another
    again = jobs.schedule_retrain(db, settings, send=sent.append)
    assert again["outcome"] == f"skipped: job #{tick['job']} is still queued" and len(sent) == 1
    # once it has trained, only corrections received after its start count
    db.execute("UPDATE training_jobs SET status = 'done', started_at = now(), finished_at = now()"
               " WHERE id = %s", (tick["job"],))
    later = jobs.schedule_retrain(db, settings, send=sent.append)
    assert later["status"] == "skipped" and later["outcome"].startswith("skipped: 0 correction(s) since ")


def test_beat_entry_follows_the_cron_setting():
    try:
        configure(Settings(retrain_cron="0 3 * * 0", train_queue="train-x"))
        entry = app.conf.beat_schedule["scheduled-retrain"]
        assert entry["task"] == training.tasks.RETRAIN_SCHEDULED_TASK and entry["task"] in app.tasks
        assert entry["options"]["queue"] == "train-x"
        assert (entry["schedule"].hour, entry["schedule"].minute, entry["schedule"].day_of_week) == ({3}, {0}, {0})
        configure(Settings())  # no cron: only `enrich retrain`
        assert "scheduled-retrain" not in app.conf.beat_schedule
    finally:
        configure(Settings())
