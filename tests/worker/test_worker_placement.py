"""Processes an operator can place: several `enrich worker` processes on one host and one RabbitMQ, beat's schedule
file in the data directory, beat's tick in `heartbeats`, and `enrich health --beat` failing when the tick is old."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

from typer.testing import CliRunner

from core.celery_app import send_enrich
from core.config import Settings
from enrich.cli import app
from harness.cluster import worker_process_env
from harness.images import png_bytes
from harness.net import free_port
from schemas.events import ListingEvent
from tests.worker.conftest import AMQP, wait_until
from worker.store import upsert_listings


def _start(env: dict, log, cwd, *args: str) -> subprocess.Popen:
    """`enrich worker` as a real process in `cwd` (its stderr appended to `log`)."""
    return subprocess.Popen([sys.executable, "-m", "enrich.cli", "worker", *args, "--loglevel=INFO"], cwd=cwd,
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("a"))


def _healthz(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())
    except OSError:
        return None


def test_two_gpu_workers_and_a_beat_worker_share_one_host(db, pg_url, model_dir, tmp_path, use_celery):
    tag = uuid.uuid4().hex[:8]
    queues = {"gpu_queue": f"gpu-{tag}", "backfill_queue": f"backfill-{tag}", "cpu_queue": f"cpu-{tag}",
              "train_queue": f"train-{tag}"}
    data, cwd = tmp_path / "data", tmp_path / "cwd"
    cwd.mkdir()
    env = worker_process_env(pg_url, queues["gpu_queue"], model_dir=model_dir, data_dir=data, beat_tick_s=1,
                             torch_threads=1, **{k: v for k, v in queues.items() if k != "gpu_queue"})
    db.execute("DELETE FROM heartbeats WHERE name = 'beat'")
    logs = [tmp_path / f"gpu{i}.log" for i in (1, 2)] + [tmp_path / "beat.log"]
    port = free_port()
    # default node names: two workers with the same queues on one host must not collide on the broker
    procs = [_start(env, logs[0], cwd, "-Q", f"{queues['gpu_queue']},{queues['backfill_queue']}"),
             _start(env, logs[1], cwd, "-Q", f"{queues['gpu_queue']},{queues['backfill_queue']}"),
             _start(env, logs[2], cwd, "-Q", queues["cpu_queue"], "--beat", "--metrics-port", str(port))]
    try:
        wait_until(lambda: all(" ready." in log.read_text() for log in logs)
                   or any(p.poll() is not None for p in procs))
        assert all(p.poll() is None for p in procs), [log.read_text()[-3000:] for log in logs]

        settings = use_celery(Settings(celery_broker_url=AMQP, gpu_queue=queues["gpu_queue"]))
        (tmp_path / "a.png").write_bytes(png_bytes())
        ids = [f"p{i}" for i in range(8)]
        with db.transaction():
            upsert_listings(db, [ListingEvent(listing_id=i, seller_id="s", images=[str(tmp_path / "a.png")])
                                 for i in ids])
        for i in ids:  # one task each (prefetch 1): both gpu workers get some
            send_enrich([i], settings)
        wait_until(lambda: db.execute("SELECT count(*) FROM listings WHERE status = 'enriched'").fetchone()[0] == 8)
        wait_until(lambda: all("enrich.listings[" in log.read_text() and "succeeded" in log.read_text()
                               for log in logs[:2]))

        # beat ticks on the cpu queue; the worker beside it records them
        wait_until(lambda: db.execute("SELECT count(*) FROM heartbeats WHERE name = 'beat'").fetchone()[0] == 1)
        wait_until(lambda: (_healthz(port) or {}).get("checks", {}).get("beat") == "ok")
        assert list(data.glob("celerybeat-schedule*")), "beat's schedule file is not in the data directory"
        assert list(cwd.glob("*")) == [], "something was written to the working directory"
        assert all(p.poll() is None for p in procs), [log.read_text()[-3000:] for log in logs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)


def test_health_beat_fails_when_the_last_tick_is_old(db, pg_url):
    env = {"ENRICH_BEAT_TICK_S": "10"}

    def health(*args: str):
        return CliRunner().invoke(app, ["health", "--no-broker", "--database-url", pg_url, *args], env=env)

    db.execute("DELETE FROM heartbeats WHERE name = 'beat'")
    never = health("--beat")
    assert never.exit_code == 1 and "beat never seen: beat down, or no worker serves the cpu queue" in never.output

    db.execute("INSERT INTO heartbeats (name, seen_at) VALUES ('beat', now() - interval '45 seconds')")
    stale = health("--beat")
    assert stale.exit_code == 1, stale.output
    assert "beat not seen for 45 s: beat down, or no worker serves the cpu queue" in stale.output
    assert health().exit_code == 0  # without --beat, beat is not looked at

    db.execute("UPDATE heartbeats SET seen_at = now() - interval '25 seconds' WHERE name = 'beat'")
    fresh = health("--beat")
    assert fresh.exit_code == 0 and "beat: ok" in fresh.output, fresh.output
