"""Fault 5: the RabbitMQ node is killed -9 in the middle of a run and restarted on the same data (a private
node: the shared one is never touched). Runs in the background lane (the node's restart mostly waits).

The worker loses its connection with a task unacknowledged (redelivered after the restart) and reconnects;
tasks enqueued before the kill must survive it (durable queue, persistent messages). The second half of the
events arrives while the node is down: the consumer cannot enqueue (its batch is replayed once the broker is
back) nor read the queue depth (it pauses meanwhile).
"""
from __future__ import annotations

import time

import pytest

from harness.cluster import count_enriched, mixed_listings, outcome, process_report, produce, settle, wait_for

N = 500


def scenario(lab) -> dict:
    rabbit = lab.private_rabbit()
    stack = lab.stack(amqp=rabbit.url, max_queue_depth=4)
    records, good, poison = mixed_listings("rb", N, stack.images)
    first, rest = records[:len(records) // 2], records[len(records) // 2:]
    produce(stack.kafka, stack.topic, first)
    worker, consumer = stack.worker(), stack.consumer()
    wait_for(lambda: count_enriched(stack.pg_url) >= N // 4, 180, "a quarter enriched", [worker, consumer])
    killed_at = count_enriched(stack.pg_url)
    rabbit.kill9()
    down = time.monotonic()
    produce(stack.kafka, stack.topic, rest)
    time.sleep(2)
    rabbit.start()
    down = time.monotonic() - down
    stuck = settle(stack.pg_url, good, procs=[worker, consumer])
    out = outcome(stack.pg_url, good, "rabbitmq kill -9 + restart", stack.kafka, stack.dlq_topic, poison,
                  stuck=stuck)
    return {"out": out, "killed_at": killed_at, "down": down, "alive": worker.alive and consumer.alive,
            "procs": process_report([worker, consumer])}


@pytest.mark.early.with_args(scenario)
def test_rabbitmq_kill9_and_restart_mid_run(lane):
    r = lane.result(scenario)
    print(f"{r['out'].line()}\nRabbitMQ killed with {r['killed_at']} enriched, down {r['down']:.1f}s")
    assert r["killed_at"] < N // 2, "the kill did not land mid-stream"
    assert r["out"].clean(), r["out"].report()
    assert r["alive"], r["procs"]
