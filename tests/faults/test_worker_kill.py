"""Fault 1: `enrich worker` killed -9 in the middle of a task, then a full replay of the topic.

A task of 16 listings runs as 4 forward passes of 4, each written in its own transaction, so the kill leaves
part of a task committed; RabbitMQ redelivers the unacknowledged task to the next worker, which must skip what
is written. The replay (a consumer in a new group reading the topic from offset 0) enqueues every listing
still pending a second time while the redelivered task is still queued.
"""
from __future__ import annotations

from harness.cluster import (
    count_enriched,
    mixed_listings,
    outcome,
    process_report,
    produce,
    settle,
    wait_for,
    worker_mid_task,
)

N = 400  # 25 tasks of 16: the kill lands a third of the way in


def test_worker_kill9_mid_batch_then_full_replay(make_stack):
    stack = make_stack(task_listings=16, batch_size=4)
    records, good, poison = mixed_listings("wk", N, stack.images)
    produce(stack.kafka, stack.topic, records)
    consumer = stack.consumer()
    first = stack.worker("worker-1")
    wait_for(lambda: count_enriched(stack.pg_url) >= N // 3, 180, "a third enriched", [consumer, first])
    wait_for(lambda: worker_mid_task(first), 60, "worker 1 inside a task", [first], interval=0.01)
    first.kill9()
    killed_at = count_enriched(stack.pg_url)

    consumer.terminate()
    replay = stack.consumer("consume-replay", consumer_group=stack.group + "-replay")  # offset 0 again
    second = stack.worker("worker-2")
    wait_for(lambda: (replay.metric("enrich_events_consumed_total") or 0) >= len(records), 120,
             "the replay read the whole topic", [replay, second])
    stuck = settle(stack.pg_url, good, procs=[replay, second])
    out = outcome(stack.pg_url, good, "worker kill -9 + replay", stack.kafka, stack.dlq_topic, poison, stuck=stuck)
    print(f"{out.line()}\nworker killed mid-task with {killed_at} enriched")
    assert 0 < killed_at < N, "the kill did not land mid-stream"
    assert out.clean(), out.report()
    assert replay.alive and second.alive, process_report([replay, second])
