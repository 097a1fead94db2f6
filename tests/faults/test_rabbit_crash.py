"""Fault 5: the RabbitMQ node is killed -9 in the middle of a run and restarted on the same data (a private
node: the shared one is never touched).

The consumer cannot enqueue (its write is replayed once the broker is back) nor read the queue depth (it
pauses); the worker loses its connection with a task unacknowledged (redelivered after the restart) and
reconnects. Tasks enqueued before the kill must survive it (durable queue, persistent messages).
"""
from __future__ import annotations

import time

from tests.faults.cluster import count_enriched, mixed_listings, outcome, process_report, produce, wait_for, \
    wait_settled

N = 800


def test_rabbitmq_kill9_and_restart_mid_run(make_stack, private_rabbit):
    stack = make_stack(amqp=private_rabbit.url, max_queue_depth=4)
    records, good, poison = mixed_listings("rb", N, stack.images)
    produce(stack.kafka, stack.topic, records)
    worker, consumer = stack.worker(), stack.consumer()
    wait_for(lambda: count_enriched(stack.pg_url) >= N // 4, 180, "a quarter enriched", [worker, consumer])
    private_rabbit.kill9()
    killed_at = time.monotonic()
    time.sleep(2)
    private_rabbit.start()
    print(f"RabbitMQ down {time.monotonic() - killed_at:.1f}s")
    done = wait_settled(stack.pg_url, good, procs=[worker, consumer])
    out = outcome(stack.pg_url, good, "rabbitmq kill -9 + restart", stack.kafka, stack.dlq_topic, poison)
    assert done and not out.problems(), out.report()
    assert worker.alive and consumer.alive, process_report([worker, consumer])
