"""Fault 4: the Postgres server crashes (`pg_ctl -m immediate stop`: every backend killed, no checkpoint) in
the middle of a run and comes back a few seconds later with crash recovery, under a running consumer and
worker (a private cluster: the shared server is never touched).

The consumer's write fails and is replayed (transient); the worker's task fails on a lost connection and is
retried. Backpressure (a GPU queue of at most 4 tasks) keeps the consumer reading at the worker's pace, so
both are mid-stream when the server dies.
"""
from __future__ import annotations

import time

from tests.faults.cluster import count_enriched, mixed_listings, outcome, process_report, produce, wait_for, \
    wait_settled

N = 800


def test_postgres_crash_restart_mid_run(make_stack, private_pg):
    stack = make_stack(pg_url=private_pg.url, max_queue_depth=4)
    records, good, poison = mixed_listings("pg", N, stack.images)
    produce(stack.kafka, stack.topic, records)
    worker, consumer = stack.worker(), stack.consumer()
    wait_for(lambda: count_enriched(stack.pg_url) >= N // 4, 180, "a quarter enriched", [worker, consumer])
    private_pg.crash()
    killed_at = time.monotonic()
    time.sleep(3)  # down long enough for both processes to hit it
    private_pg.start()
    print(f"Postgres down {time.monotonic() - killed_at:.1f}s")
    done = wait_settled(stack.pg_url, good, procs=[worker, consumer])
    out = outcome(stack.pg_url, good, "postgres crash-restart", stack.kafka, stack.dlq_topic, poison)
    assert done and not out.problems(), out.report()
    assert worker.alive and consumer.alive, process_report([worker, consumer])
