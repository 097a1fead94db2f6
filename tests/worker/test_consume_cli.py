"""`enrich consume` as a real process: metrics + health endpoints, SIGTERM stops it cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from kafka import KafkaProducer
from typer.testing import CliRunner

from enrich.cli import app
from harness.net import free_port

ROOT = Path(__file__).resolve().parents[2]



def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_consume_serves_metrics_and_stops_on_sigterm(kafka_bootstrap, pg_url, db, tmp_path):
    topic = f"listings-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {**os.environ, "ENRICH_DATABASE_URL": pg_url, "ENRICH_KAFKA_BOOTSTRAP": kafka_bootstrap,
           "ENRICH_LISTINGS_TOPIC": topic, "ENRICH_DLQ_TOPIC": topic + ".dlq",
           "ENRICH_CELERY_BROKER_URL": "redis://127.0.0.1:6379/0", "ENRICH_GPU_QUEUE": f"gpu-{uuid.uuid4().hex[:6]}",
           "ENRICH_CONSUMER_GROUP": f"g-{uuid.uuid4().hex[:6]}", "PYTHONPATH": str(ROOT),
           "ENRICH_KAFKA_SESSION_TIMEOUT_MS": "6000", "ENRICH_KAFKA_HEARTBEAT_INTERVAL_MS": "500"}
    # the topic exists before the consumer subscribes (as in production)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    listing = {"listing_id": "m1", "seller_id": "s", "images": ["a.png"]}
    producer.send(topic, key=b"m1", value=json.dumps(listing).encode())
    producer.send(topic, key=b"m2", value=b"not json")
    producer.flush()
    producer.close()
    log = tmp_path / "consume.log"
    proc = subprocess.Popen([sys.executable, "-m", "enrich.cli", "consume", "--metrics-port", str(port), "--json-logs"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and db.execute("SELECT count(*) FROM listings").fetchone()[0] == 0:
            time.sleep(0.2)
        assert db.execute("SELECT listing_id, status FROM listings").fetchall() == [("m1", "pending")], log.read_text()
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert f'enrich_events_consumed_total{{topic="{topic}"}}' in body
        assert 'enrich_dead_letters_total{reason="not_json"} 1.0' in body
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and json.loads(body)["checks"] == {"database": "ok", "broker": "ok"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        assert any(line["msg"].startswith("intake stopped") for line in lines)
        assert any(line["level"] == "WARNING" and "to DLQ" in line["msg"] for line in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_health_command(pg_url, use_celery):
    # the command reads its settings from the environment, as a process start does
    env = {"ENRICH_CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"}
    ok = CliRunner().invoke(app, ["health", "--database-url", pg_url], env=env)
    assert ok.exit_code == 0 and "database: ok" in ok.output and "broker: ok" in ok.output
    bad = CliRunner().invoke(app, ["health", "--no-broker", "--database-url",
                                   "postgresql://postgres@127.0.0.1:1/none"], env=env)
    assert bad.exit_code == 1 and "database: DatabaseUnavailable" in bad.output
