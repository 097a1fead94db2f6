"""Fault 7: the image host (the S3 endpoint) goes down for longer than the first retries, then comes back
(a private moto, killed -9 and restarted: the shared one is never touched; it serves the same images again
from its first request after the restart, see harness/s3_server.py). Runs in the background lane (it
mostly waits).

Fetches fail as "unavailable" (transient): each task re-enqueues the affected listings with backoff (0.5, 1,
2, 4, then every 8 s here: ENRICH_RETRY_BACKOFF_MAX_S, so that a restart slowed by load never meets a delay longer
than the wait for progress). Nothing may be marked failed, and every listing is enriched once the host is back.

If a batch is still pending after 150 s without progress, its task was lost (a retried batch sometimes never
comes back — an open bug, printed and counted as `swept`): what beat's `enrich sweep` does in production
(pending > 30 min, every 10 min) is done here at once, and the run must then end clean.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from harness.cluster import count_enriched, mixed_listings, outcome, process_report, produce, settle, wait_for

N = 400
DOWN_S = 10  # the retries after 0.5, 1, 2 and 4 s (7.5 s in all) meet the outage


def scenario(lab) -> dict:
    s3 = lab.private_s3()
    # a RabbitMQ node of its own, as every lane scenario (conftest.py)
    stack = lab.stack(s3=s3.url, amqp=lab.private_rabbit().url, max_queue_depth=4, retry_backoff_s=0.5,
                      retry_backoff_max_s=8, task_max_retries=20, fetch_timeout_s=2)
    records, good, poison = mixed_listings("s3", N, stack.images)
    produce(stack.kafka, stack.topic, records)
    worker, consumer = stack.worker(), stack.consumer()
    wait_for(lambda: count_enriched(stack.pg_url) >= N // 4, 180, "a quarter enriched", [worker, consumer])
    down_at = count_enriched(stack.pg_url)
    s3.kill9()
    time.sleep(DOWN_S)
    t_down = time.monotonic()
    s3.start()
    back_after = time.monotonic() - t_down + DOWN_S
    retries = worker.log.read_text().count("Retry in")  # Celery's line for each task retry
    stuck = settle(stack.pg_url, good, procs=[worker, consumer], stall=150)
    swept, tail = 0, ""
    if stuck:  # a lost task: the sweep enqueues its listings again, as beat would
        tail = "\n".join(worker.log.read_text().splitlines()[-25:])
        done = subprocess.run([sys.executable, "-m", "enrich.cli", "sweep", "--older-than", "60"], env=stack.env(),
                              capture_output=True, text=True, timeout=120)
        swept = done.stdout + done.stderr
        stuck = settle(stack.pg_url, good, procs=[worker, consumer], stall=150)
    out = outcome(stack.pg_url, good, "image host down", stack.kafka, stack.dlq_topic, poison, stuck=stuck)
    if stuck:  # what the worker did last, for whoever reads the failure
        out.notes.append(f"host back after {back_after:.0f}s; worker log tail before the sweep:\n{tail}")
    return {"out": out, "down_at": down_at, "retries": retries, "alive": worker.alive and consumer.alive,
            "procs": process_report([worker, consumer]), "back_after": back_after, "swept": swept}


@pytest.mark.early.with_args(scenario)
def test_image_host_down_then_back(lane):
    r = lane.result(scenario)
    print(f"{r['out'].line()}\nimage host down {r['back_after']:.0f}s with {r['down_at']} enriched; "
          f"{r['retries']} task retries meanwhile; sweep after a lost task: {r['swept'] or 'not needed'}")
    assert r["down_at"] < N, "the outage did not land mid-stream"
    assert r["retries"] >= 3, "the outage was not met by several retries"
    assert r["out"].clean(), r["out"].report()
    assert r["alive"], r["procs"]

