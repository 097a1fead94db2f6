"""The sharded reindex (`enrich reindex --shards N`) over 2 real `enrich worker` processes on the cpu queue.

RabbitMQ is the broker and Redis the result backend (the chord joins there), as in deploy/. Faults are real:
a shard's database connection is cut by pg_terminate_backend while a row lock holds it still; a dispatcher that
lost a range sends a chord over 3 of the 4 planned shards.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest
from celery import chord
from similar_helpers import add_listings, clustered, exact_neighbours
from typer.testing import CliRunner

from core.celery_app import app as celery_app
from core.celery_app import configure
from core.config import Settings, get_settings
from enrich.cli import app as cli
from similar import nightly
from similar import store as sdb
from similar.tasks import dispatch_shards, reindex_failed, reindex_finish, reindex_shard

ROOT = Path(__file__).resolve().parents[2]
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
REDIS_BACKEND = "redis://127.0.0.1:6379/1"
K = 10
IDS = [f"lst-{i:05d}" for i in range(3000)]
MAX_RETRIES = 2


def wait_until(predicate, timeout: float = 120.0):
    """Poll until the workers have caught up (a hang guard, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached")


@dataclass
class Cluster:
    logs: list[Path]

    def count(self, pattern: str) -> list[int]:
        """Log lines matching `pattern`, per worker."""
        return [len(re.findall(pattern, log.read_text())) for log in self.logs]


@pytest.fixture()
def cluster(monkeypatch, pg_url, root, tmp_path):
    """2 `enrich worker -Q <cpu queue> --concurrency 1` processes sharing one snapshot directory (one machine),
    and this process configured like them (the CLI reads the same environment)."""
    env = {"ENRICH_DATABASE_URL": pg_url, "ENRICH_CELERY_BROKER_URL": AMQP,
           "ENRICH_CELERY_RESULT_BACKEND": REDIS_BACKEND, "ENRICH_CPU_QUEUE": f"cpu-shards-{uuid.uuid4().hex[:8]}",
           "ENRICH_INDEX_DIR": str(root), "ENRICH_DATA_DIR": str(tmp_path / "data"),
           "ENRICH_RETRY_BACKOFF_S": "0.2", "ENRICH_TASK_MAX_RETRIES": str(MAX_RETRIES), "COLUMNS": "200"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ENRICH_INDEX_URI", raising=False)
    monkeypatch.delenv("ENRICH_REINDEX_SHARDS", raising=False)
    procs, logs = [], []
    for i in range(2):
        log = tmp_path / f"worker-{i}.log"
        cmd = [sys.executable, "-m", "enrich.cli", "worker", "--queues", env["ENRICH_CPU_QUEUE"], "--concurrency",
               "1", "--hostname", f"shards-{i}-{uuid.uuid4().hex[:6]}@%h"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                      stdout=subprocess.DEVNULL, stderr=log.open("w")))
        logs.append(log)
    try:
        wait_until(lambda: all(" ready." in log.read_text() for log in logs))
        configure(get_settings())
        yield Cluster(logs)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        monkeypatch.undo()
        configure(Settings())


def catalogue(db) -> np.ndarray:
    vecs = clustered(len(IDS), dim=64, clusters=30, seed=40)
    add_listings(db, IDS, vecs)
    return vecs


def rows_of(db, version: int) -> dict[str, tuple[list[str], list[float]]]:
    return {lid: (n, s) for lid, n, s in db.execute(
        "SELECT listing_id, neighbour_ids, scores FROM similar_items WHERE version = %s", (version,)).fetchall()}


def finished(db, version: int) -> sdb.Version | None:
    """The version once it no longer builds (switched or failed)."""
    info = sdb.version_info(db, version)
    return info if info is not None and info.status != "building" else None


SHARD = r"Task enrich\.reindex_shard\[[^\]]+\] "


def test_two_workers_write_the_same_rows_as_one_process(db, cluster, settings):
    catalogue(db)
    one = nightly.recompute(db, "m1", k=K, factory="Flat", settings=settings)  # exact: deterministic
    single = rows_of(db, one.version)

    out = CliRunner().invoke(cli, ["reindex", "-m", "m1", "--k", str(K), "--factory", "Flat", "--shards", "4",
                                   "--wait"])
    assert out.exit_code == 0, out.output
    assert "4 of 4 shards written" in out.output and "switched" in out.output
    version = sdb.active_version(db, "m1")
    assert version != one.version
    sharded = rows_of(db, version)
    assert sharded.keys() == single.keys() == set(IDS)
    for lid, (neighbours, scores) in single.items():
        assert sharded[lid][0] == neighbours, lid
        np.testing.assert_allclose(sharded[lid][1], scores, atol=1e-5)
    # the 4 shards ran on both processes
    done = cluster.count(SHARD + "succeeded")
    assert sum(done) == 4 and all(done), done


def _shard_waiting_on_lock(db) -> int | None:
    """The backend of a shard blocked deleting its range (the row lock below), if any."""
    pids = [pid for (pid,) in db.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        " AND query LIKE 'DELETE FROM similar_items WHERE version = %listing_id%'")]
    return pids[0] if pids else None


def _lock_a_row_of_shard(db, pg_url: str, version: int, bounds, shard: int):
    """A row in shard `shard`'s range (as an earlier try of it would have left), locked by another
    transaction: that shard's DELETE waits on it while the other shards go on."""
    lo, hi = bounds[shard]
    victim = next(i for i in sorted(IDS) if (lo is None or i >= lo) and (hi is None or i < hi))
    db.execute("INSERT INTO similar_items (version, listing_id, neighbour_ids, scores) VALUES (%s, %s, %s, %s)",
               (version, victim, ["stale"], [0.0]))
    locker = psycopg.connect(pg_url)
    locker.execute("SELECT 1 FROM similar_items WHERE version = %s AND listing_id = %s FOR UPDATE",
                   (version, victim))
    return locker, victim


def test_a_shard_that_loses_its_connection_is_retried_alone(db, pg_url, cluster, settings):
    vecs = catalogue(db)
    version, bounds = nightly.prepare_shards(db, "m1", 4, k=K, factory="Flat", settings=settings)
    locker, victim = _lock_a_row_of_shard(db, pg_url, version, bounds, 2)
    try:
        dispatch_shards(version, bounds)
        pid = wait_until(lambda: _shard_waiting_on_lock(db))
        db.execute("SELECT pg_terminate_backend(%s)", (pid,))  # its connection is gone mid-transaction
    finally:
        locker.rollback()
        locker.close()
    wait_until(lambda: sdb.active_version(db, "m1") == version)

    rows = rows_of(db, version)
    assert {lid: n for lid, (n, _) in rows.items()} == exact_neighbours(vecs, IDS, K)
    assert rows[victim][0] != ["stale"]  # the retry replaced its range
    assert sum(cluster.count(SHARD + r"retry: Retry in .*terminating connection")) == 1
    # 4 shards + 1 retry of the one that failed: the others were not run again
    assert sum(cluster.count(SHARD + "received")) == 5
    assert sum(cluster.count(SHARD + "succeeded")) == 4
    info = sdb.version_info(db, version)
    assert info is not None and sorted(info.params["written"]) == ["0", "1", "2", "3"]


def test_a_shard_that_keeps_failing_leaves_the_version_failed(db, pg_url, cluster, settings):
    catalogue(db)
    first = nightly.recompute(db, "m1", k=K, factory="Flat", settings=settings)
    version, bounds = nightly.prepare_shards(db, "m1", 4, k=K, factory="Flat", settings=settings)
    locker, _ = _lock_a_row_of_shard(db, pg_url, version, bounds, 1)
    try:
        dispatch_shards(version, bounds)
        for _ in range(1 + MAX_RETRIES):  # every try of that shard loses its connection
            pid = wait_until(lambda: _shard_waiting_on_lock(db))
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_until(lambda killed=pid: _shard_waiting_on_lock(db) != killed)
    finally:
        locker.rollback()
        locker.close()
    info = wait_until(lambda: finished(db, version))

    assert info.status == "failed"
    assert "a shard failed" in info.params["error"] and "terminating connection" in info.params["error"]
    assert sdb.active_version(db, "m1") == first.version  # never switched
    assert rows_of(db, version) == {}
    assert sum(cluster.count(SHARD + r"retry: Retry in")) == MAX_RETRIES
    assert sum(cluster.count(SHARD + "succeeded")) == 3


def test_the_version_switches_only_when_every_shard_wrote(db, cluster, settings):
    catalogue(db)
    first = nightly.recompute(db, "m1", k=K, factory="Flat", settings=settings)
    version, bounds = nightly.prepare_shards(db, "m1", 4, k=K, factory="Flat", settings=settings)
    # a dispatcher that lost one range: the chord's 3 shards succeed, so its callback runs
    chord(reindex_shard.s(version, lo, hi) for lo, hi in bounds[:3])(
        reindex_finish.si(version, 1).on_error(reindex_failed.s(version)))
    info = wait_until(lambda: finished(db, version))

    assert info.status == "failed"
    assert "only 3 of 4 shards wrote their rows" in info.params["error"]
    assert sdb.active_version(db, "m1") == first.version
    assert rows_of(db, version) == {}


@pytest.mark.parametrize("backend", [None, "rpc://"])
def test_shards_without_a_chord_backend_fail_at_once(db, pg_url, monkeypatch, backend):
    catalogue(db)
    monkeypatch.setenv("ENRICH_DATABASE_URL", pg_url)
    monkeypatch.setenv("ENRICH_CELERY_BROKER_URL", AMQP)
    monkeypatch.setenv("COLUMNS", "200")
    if backend:
        monkeypatch.setenv("ENRICH_CELERY_RESULT_BACKEND", backend)
    else:
        monkeypatch.delenv("ENRICH_CELERY_RESULT_BACKEND", raising=False)
    try:
        out = CliRunner().invoke(cli, ["reindex", "--shards", "2", "--wait"])
    finally:
        configure(Settings())
    assert out.exit_code == 2, out.output
    assert "needs a Celery result backend" in out.output and "ENRICH_CELERY_RESULT_BACKEND" in out.output
    assert db.execute("SELECT count(*) FROM similar_items_versions").fetchone()[0] == 0  # nothing started


def test_the_nightly_beat_entry_uses_the_shards_setting():
    try:
        configure(Settings(reindex_shards=3, celery_result_backend=REDIS_BACKEND))
        assert celery_app.conf.beat_schedule["nightly-similar-items"]["kwargs"] == {"shards": 3}
        configure(Settings())
        assert celery_app.conf.beat_schedule["nightly-similar-items"]["kwargs"] == {"shards": 1}
    finally:
        configure(Settings())
