"""A training job an operator can trust: a running job beats (its own connection), a job whose worker died is
marked failed by the heartbeat rule (whoever reads the jobs, a fresh worker's start, beat), an admin cancels a
queued or running job, and `enrich retrain --wait` exits 0 only when the job's model was promoted.

Real Postgres, Celery workers on a Redis broker (queues of the test's own), real training (tiny preset, or the
quick one where a job must run long enough to be killed or cancelled)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from core.celery_app import configure
from core.config import Settings
from enrich.cli import app as cli
from model.registry import active_version
from tests.training import test_retrain_job
from tests.worker.conftest import start_worker_process
from training import jobs

ROOT = Path(__file__).resolve().parents[2]
LONG = {"preset": "quick", "time_budget_s": 600}  # a job that trains for minutes unless stopped
FAST_BEATS = {"ENRICH_JOB_HEARTBEAT_S": "0.5", "ENRICH_JOB_STALE_S": "3"}
# the retraining tests' fixtures, under their names here
env, queues, train_worker = test_retrain_job.env, test_retrain_job.queues, test_retrain_job.train_worker
wait_until = test_retrain_job.wait_until


@pytest.fixture()
def celery_for():
    """Configure this process's Celery app as a process start would (to send jobs); reset it afterwards."""
    def use(settings: Settings) -> Settings:
        configure(settings)
        return settings
    yield use
    configure(Settings())


def _process_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}  # the env fixture's settings are in os.environ


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(30)


def _running_with_beats(db, job_id: int) -> dict:
    """Wait until the job runs and its heartbeat has moved on at least once; return the row."""
    first = wait_until(lambda: (j := jobs.get_job(db, job_id))["status"] == "running" and j["heartbeat_at"],
                       timeout=180)
    return wait_until(lambda: (j := jobs.get_job(db, job_id))["heartbeat_at"] > first and j, timeout=60)


@pytest.mark.parametrize("noticed_by", ["job_progress", "a fresh worker's start"])
def test_a_job_whose_worker_is_killed_is_marked_failed(noticed_by, env, queues, db, tmp_path, celery_for):
    celery_for(env(**FAST_BEATS))
    log = tmp_path / "worker.log"
    first = start_worker_process(_process_env(), log, "-Q", queues["train"])
    fresh = None
    try:
        job_id = jobs.request_retrain(db, requested_by="ops", reason="long run", params=LONG)
        _running_with_beats(db, job_id)
        alive = jobs.job_progress(db, stale_s=3)[0]  # beating: not taken for dead
        assert alive["id"] == job_id and alive["status"] == "running"
        assert re.search(r", \d+ s ago$", alive["summary"]), alive["summary"]
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        if noticed_by == "job_progress":  # what `enrich models` and the console read
            job = wait_until(lambda: (j := jobs.job_progress(db, stale_s=3)[0])["status"] == "failed" and j)
            assert re.fullmatch(r"failed: no heartbeat for \d+ s — its worker died \(.+\)", job["outcome"]), \
                job["outcome"]
        else:
            fresh = start_worker_process(_process_env(), log, "-Q", queues["train"])
            job = wait_until(lambda: (j := jobs.get_job(db, job_id))["status"] == "failed" and j, timeout=120)
            assert job["outcome"].startswith("failed: ") and "worker" in job["outcome"], job["outcome"]
        assert job["id"] == job_id and job["finished_at"] is not None
        assert job["progress"]["stage"].startswith("failed at ")
    finally:
        _kill(first)
        _kill(fresh)


def test_beat_marks_a_job_without_heartbeat_failed_even_while_the_lock_is_held(db, pg_url, tmp_path):
    """A worker on a lost machine may keep its Postgres session (and the lock) for hours: its silence decides."""
    db.execute("TRUNCATE training_jobs CASCADE")
    settings = Settings(data_dir=tmp_path, job_stale_s=3, retrain_min_corrections=1000)
    dead = jobs.create_job(db, trigger="admin", requested_by="ops", reason="lost node")
    db.execute("UPDATE training_jobs SET status = 'running', started_at = now() - interval '1 hour',"
               " heartbeat_at = now() - interval '10 minutes' WHERE id = %s", (dead,))
    holder = psycopg.connect(pg_url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (jobs.LOCK_KEY,))
    try:
        tick = jobs.schedule_retrain(db, settings, send=lambda _: None)
    finally:
        holder.close()
    job = jobs.get_job(db, dead)
    assert job["status"] == "failed" and job["outcome"].startswith("failed: no heartbeat for 600 s")
    assert tick["status"] == "skipped" and "still" not in tick["outcome"]  # the dead job blocks no tick


def test_describe_shows_how_long_ago_a_running_job_was_heard_of():
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    job = {"id": 7, "status": "running", "trigger": "admin", "requested_by": "alice", "reason": "",
           "progress": {"stage": "2-classification", "step": 720, "of": 4800,
                        "updated_at": (now - timedelta(minutes=25)).isoformat()},
           "started_at": now - timedelta(hours=1), "heartbeat_at": now - timedelta(seconds=12)}
    assert jobs.describe(job, now=now) == "#7 running (admin, alice) 2-classification step 720/4800, 12 s ago"
    job["heartbeat_at"] = None  # no heartbeat: the progress's time
    assert jobs.describe(job, now=now).endswith("step 720/4800, 25 min ago")
    job["cancel_requested_by"] = "bob"
    assert jobs.describe(job, now=now).endswith("25 min ago; cancelling (asked by bob)")


def test_a_queued_job_is_cancelled_at_once_and_its_task_does_nothing(env, train_worker, queues, db, celery_for):
    settings = celery_for(env())
    cancelled = jobs.request_retrain(db, requested_by="alice", reason="typo in the reason")  # no worker yet
    res = CliRunner().invoke(cli, ["retrain", "--cancel", str(cancelled), "--by", "bob"])
    assert res.exit_code == 0, res.output
    job = jobs.get_job(db, cancelled)
    assert job["status"] == "cancelled" and job["outcome"] == "cancelled by bob before it started"
    assert job["finished_at"] is not None and f"#{cancelled} cancelled" in res.output
    again = CliRunner().invoke(cli, ["retrain", "--cancel", str(cancelled)])  # finished: refused
    assert again.exit_code == 1 and f"job #{cancelled} is already cancelled: nothing to cancel" in again.output
    with train_worker(settings):  # its message is delivered first, then the next job's
        after = jobs.request_retrain(db, requested_by="alice", reason="the real one")
        wait_until(lambda: jobs.get_job(db, after)["status"] in jobs.FINISHED, timeout=180)
    assert jobs.get_job(db, after)["status"] == "done"
    job = jobs.get_job(db, cancelled)
    assert job["status"] == "cancelled" and job["started_at"] is None  # its task ran nothing
    assert job["outcome"] == "cancelled by bob before it started"
    assert db.execute("SELECT count(*) FROM models").fetchone()[0] == 1  # the second job's only


def test_a_running_job_is_cancelled_registers_nothing_and_frees_the_lock(env, train_worker, queues, db, tmp_path,
                                                                          celery_for):

    settings = celery_for(env(ENRICH_JOB_HEARTBEAT_S="0.5"))
    with train_worker(settings):
        waiting = subprocess.Popen([sys.executable, "-m", "enrich.cli", "retrain", "--reason", "long", "--by", "alice",
                                    "--preset", "quick", "--wait"], cwd=ROOT, env=_process_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            job_id = wait_until(lambda: (rows := jobs.job_progress(db)) and rows[0]["id"], timeout=60)
            wait_until(lambda: jobs.get_job(db, job_id)["progress"].get("step"), timeout=180)  # training steps
            res = CliRunner().invoke(cli, ["retrain", "--cancel", str(job_id), "--by", "carol"])
            assert res.exit_code == 0, res.output
            assert f"job #{job_id} is running: cancel requested" in res.output
            out, _ = waiting.communicate(timeout=300)
        finally:
            _kill(waiting)
        job = jobs.get_job(db, job_id)
        assert job["status"] == "cancelled", job["outcome"]
        assert job["outcome"].startswith("cancelled by carol at ") and job["cancel_requested_by"] == "carol"
        assert job["model_version"] is None and db.execute("SELECT count(*) FROM models").fetchone()[0] == 0
        assert waiting.returncode == 1 and out.strip().splitlines()[-1] == f"not promoted: job #{job_id} was cancelled"
        # the lock is free: the next job trains
        after = jobs.request_retrain(db, requested_by="alice", reason="the next one")
        job = wait_until(lambda: (j := jobs.get_job(db, after))["status"] in jobs.FINISHED and j, timeout=180)
    assert job["status"] == "done", job["outcome"]


@pytest.mark.parametrize("case", ["promoted", "waits for an admin", "failed"])
def test_retrain_wait_exits_zero_only_when_the_jobs_model_was_promoted(case, env, train_worker, queues, db):
    overrides = {"promoted": {"ENRICH_AUTO_PROMOTE": "true"}, "waits for an admin": {},
                 "failed": {"ENRICH_RETRAIN_DATASET": "catalogue"}}[case]  # catalogue without a taxonomy: fails
    settings = env(**overrides)
    with train_worker(settings):
        res = CliRunner().invoke(cli, ["retrain", "--reason", case, "--by", "alice", "--wait"])
    job = jobs.job_progress(db)[0]
    last = res.output.strip().splitlines()[-1]
    if case == "promoted":
        assert res.exit_code == 0, res.output
        assert active_version(db) == job["model_version"]
        assert last == f"promoted: job #{job['id']}'s model {job['model_version']} is active"
    elif case == "waits for an admin":
        assert res.exit_code == 1, res.output
        assert job["status"] == "done" and active_version(db) is None
        assert last == f"not promoted: job #{job['id']} is done but {job['model_version']} is not the active model"
    else:
        assert res.exit_code == 1, res.output
        assert job["status"] == "failed" and last == f"not promoted: job #{job['id']} failed"
