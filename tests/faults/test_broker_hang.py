"""Fault 6: the Kafka-protocol broker hangs for 30 s (SIGSTOP, then SIGCONT) in the middle of a run: its
connections stay open and nothing answers, far longer than the consumer's session timeout (6 s). A private
Tansu: the shared broker is never touched. Runs in the background lane (it mostly waits), with a RabbitMQ node
of its own (see conftest.py: two workers on one broker cannot run at once).

The first half of the events is read before the hang, the second half is sent after it: the consumer must
come back to its group and read them, and the worker finishes what was queued meanwhile.
"""
from __future__ import annotations

import pytest

from harness.cluster import count_enriched, mixed_listings, outcome, process_report, produce, settle, wait_for

N = 500
HANG_S = 30


def scenario(lab) -> dict:
    kafka = lab.private_kafka()
    stack = lab.stack(kafka=kafka.bootstrap, amqp=lab.private_rabbit().url, max_queue_depth=4)
    records, good, poison = mixed_listings("kh", N, stack.images)
    first, rest = records[:len(records) // 2], records[len(records) // 2:]
    produce(stack.kafka, stack.topic, first)
    worker, consumer = stack.worker(), stack.consumer()
    wait_for(lambda: count_enriched(stack.pg_url) >= N // 4, 180, "a quarter enriched", [worker, consumer])
    hung_at = count_enriched(stack.pg_url)
    kafka.hang(HANG_S)
    produce(stack.kafka, stack.topic, rest)
    stuck = settle(stack.pg_url, good, procs=[worker, consumer])
    out = outcome(stack.pg_url, good, "kafka broker hung 30s", stack.kafka, stack.dlq_topic, poison, stuck=stuck)
    return {"out": out, "hung_at": hung_at, "alive": worker.alive and consumer.alive,
            "procs": process_report([worker, consumer])}


@pytest.mark.early.with_args(scenario)
def test_kafka_broker_hung_30s(lane):
    r = lane.result(scenario)
    print(f"{r['out'].line()}\nbroker hung {HANG_S}s with {r['hung_at']} enriched")
    assert r["hung_at"] < N // 2, "the hang did not land mid-stream"
    assert r["out"].clean(), r["out"].report()
    assert r["alive"], r["procs"]
