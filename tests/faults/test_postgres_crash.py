"""Fault 4: the Postgres server crashes (`pg_ctl -m immediate stop`: every backend killed, no checkpoint) in
the middle of a run and comes back a few seconds later with crash recovery (a private cluster: the shared
server is never touched). Runs in the background lane, with a RabbitMQ node of its own (conftest.py).

The worker's task fails on a lost connection and is retried; the second half of the events arrives while the
server is down, so the consumer's writes fail too and are replayed.
"""
from __future__ import annotations

import time

import pytest

from harness.cluster import count_enriched, mixed_listings, outcome, process_report, produce, settle, wait_for

N = 500


def scenario(lab) -> dict:
    pg = lab.private_pg()
    stack = lab.stack(pg_url=pg.url, amqp=lab.private_rabbit().url, max_queue_depth=4)
    records, good, poison = mixed_listings("pg", N, stack.images)
    first, rest = records[:len(records) // 2], records[len(records) // 2:]
    produce(stack.kafka, stack.topic, first)
    worker, consumer = stack.worker(), stack.consumer()
    wait_for(lambda: count_enriched(stack.pg_url) >= N // 4, 180, "a quarter enriched", [worker, consumer])
    crashed_at = count_enriched(stack.pg_url)
    pg.crash()
    produce(stack.kafka, stack.topic, rest)  # read and written while the server is down
    time.sleep(3)
    pg.start()
    stuck = settle(stack.pg_url, good, procs=[worker, consumer])
    out = outcome(stack.pg_url, good, "postgres crash-restart", stack.kafka, stack.dlq_topic, poison, stuck=stuck)
    return {"out": out, "crashed_at": crashed_at, "alive": worker.alive and consumer.alive,
            "procs": process_report([worker, consumer])}


@pytest.mark.early.with_args(scenario)
def test_postgres_crash_restart_mid_run(lane):
    r = lane.result(scenario)
    print(f"{r['out'].line()}\nPostgres crashed with {r['crashed_at']} enriched")
    assert r["crashed_at"] < N // 2, "the crash did not land mid-stream"
    assert r["out"].clean(), r["out"].report()
    assert r["alive"], r["procs"]
