"""Fault 3: two `enrich consume` processes in one group on 4 partitions; one is killed -9 and the survivor
takes its partitions over, once while the survivor flows and once while it is paused for backpressure.

The paused case is the one that loses events when the intake does not pause partitions a rebalance assigns
to it while paused: Kafka does not carry a pause over to them, the paused intake's keep-alive poll returns
their records, and records dropped there are skipped for good once later offsets are committed.
"""
from __future__ import annotations

import threading

from harness.cluster import (
    create_topic,
    group_members,
    mixed_listings,
    outcome,
    process_report,
    produce,
    queue_depth,
    settle,
    wait_for,
)

CONSUMED = "enrich_events_consumed_total"
PAUSED = "enrich_intake_paused"


def test_peer_killed_while_survivor_flows(make_stack):
    stack = make_stack()
    records, good, poison = mixed_listings("rf", 600, stack.images)
    half = len(records) // 2
    create_topic(stack.kafka, stack.topic, 4)
    worker = stack.worker()
    a, b = stack.consumer("consume-a"), stack.consumer("consume-b")
    wait_for(lambda: group_members(stack.kafka, stack.group) == ("Stable", 2), 60, "both consumers joined", [a, b])
    # events keep arriving while b dies (the first half at 200/s) and after it (the second half, half of it on
    # b's partitions: only a can read those, once it has taken them over)
    producer = threading.Thread(target=produce, args=(stack.kafka, stack.topic, records[:half]),
                                kwargs={"per_second": 200})
    producer.start()
    wait_for(lambda: (a.metric(CONSUMED) or 0) > 0 and (b.metric(CONSUMED) or 0) > 0, 60, "both consuming", [a, b])
    assert a.metric(PAUSED) == 0, "a should be flowing when b dies"
    b.kill9()
    a_at_kill = a.metric(CONSUMED) or 0
    producer.join()
    produce(stack.kafka, stack.topic, records[half:], per_second=200)
    wait_for(lambda: group_members(stack.kafka, stack.group) == ("Stable", 1), 60, "a alone in the group", [a])
    stuck = settle(stack.pg_url, good, procs=[a, worker])
    out = outcome(stack.pg_url, good, "peer killed, survivor flowing", stack.kafka, stack.dlq_topic, poison,
                  stuck=stuck)
    print(f"{out.line()}\na had read {a_at_kill:.0f} events when b died, {a.metric(CONSUMED) or 0:.0f} at the end")
    assert out.clean(), out.report()
    assert a.alive and worker.alive, process_report([a, worker])


def test_peer_killed_while_survivor_paused(make_stack):
    stack = make_stack(max_queue_depth=2)
    records, good, poison = mixed_listings("rp", 600, stack.images)
    create_topic(stack.kafka, stack.topic, 4)
    a, b = stack.consumer("consume-a"), stack.consumer("consume-b")
    wait_for(lambda: group_members(stack.kafka, stack.group) == ("Stable", 2), 60, "both consumers joined", [a, b])
    # no worker yet: a first batch fills the GPU queue past its limit and both consumers pause with their
    # partitions assigned (the one that read less may pause before reading anything); the rest of the events
    # wait in all 4 partitions
    produce(stack.kafka, stack.topic, records[:200])
    wait_for(lambda: a.metric(PAUSED) == 1 and b.metric(PAUSED) == 1 and queue_depth(stack.amqp, stack.queue) > 2,
             60, "both consumers paused", [a, b])
    produce(stack.kafka, stack.topic, records[200:])
    b.kill9()
    # a gets b's partitions while still paused (the queue is still deep: nothing drains it yet)
    wait_for(lambda: group_members(stack.kafka, stack.group) == ("Stable", 1), 60, "a alone in the group", [a])
    wait_for(lambda: a.metric(PAUSED) == 1 and queue_depth(stack.amqp, stack.queue) > 2, 10, "a still paused", [a])
    consumed = a.metric(CONSUMED) or 0
    worker = stack.worker()  # loading the model takes seconds: a polls its new partitions paused meanwhile
    stuck = settle(stack.pg_url, good, procs=[a, worker])
    out = outcome(stack.pg_url, good, "peer killed, survivor paused", stack.kafka, stack.dlq_topic, poison,
                  stuck=stuck)
    print(f"{out.line()}\na had read {consumed:.0f} events when b's partitions came to it paused")
    assert out.clean(), out.report()
    assert a.alive and worker.alive, process_report([a, worker])
