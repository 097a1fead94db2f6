"""Fault 2: `enrich consume` killed -9 after a batch is in Postgres and enqueued, before its offsets are
committed (ENRICH_TEST_CRASH_BEFORE_COMMIT=N: the intake SIGKILLs itself there), then started again.

The restarted consumer replays that batch: its upserts change nothing, its still-pending listings are enqueued
a second time, and the worker must skip the copies it already enriched.
"""
from __future__ import annotations

import signal
import threading

import psycopg

from harness.cluster import committed_offsets, mixed_listings, outcome, process_report, produce, settle, wait_for

N = 600  # the 3rd batch ends long before the topic does


def _written_not_committed(db_url: str, committed: dict[int, int]) -> int:
    """Events in Postgres at or past their partition's committed offset: what the restart must replay."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute("SELECT kafka_partition, kafka_offset FROM processed_events").fetchall()
    return sum(1 for part, off in rows if off >= committed.get(part, 0))


def test_consumer_kill9_between_db_commit_and_offset_commit(make_stack):
    stack = make_stack()
    records, good, poison = mixed_listings("ck", N, stack.images)
    worker = stack.worker()
    first = stack.consumer("consume-1", test_crash_before_commit=3)
    # a first batch of 50, then the rest at 200/s while the consumer polls: its batches stay small
    produce(stack.kafka, stack.topic, records[:50])
    wait_for(lambda: (first.metric("enrich_events_consumed_total") or 0) >= 50, 60, "consumer 1 read the 1st batch",
             [first])
    producer = threading.Thread(target=produce, args=(stack.kafka, stack.topic, records[50:]),
                                kwargs={"per_second": 200})
    producer.start()
    wait_for(lambda: not first.alive, 90, "consumer 1 killing itself after its 3rd durable batch", [worker])
    assert first.returncode == -signal.SIGKILL, first.tail()
    pending_replay = _written_not_committed(stack.pg_url, committed_offsets(stack.kafka, stack.group))
    with psycopg.connect(stack.pg_url) as conn:
        in_db = conn.execute("SELECT count(*) FROM listings").fetchone()[0]
    producer.join()

    second = stack.consumer("consume-2")
    stuck = settle(stack.pg_url, good, procs=[second, worker])
    out = outcome(stack.pg_url, good, "consumer kill -9 before offset commit", stack.kafka, stack.dlq_topic, poison,
                  stuck=stuck)
    print(f"{out.line()}\nconsumer killed with {in_db} listings in Postgres, {pending_replay} of them past the "
          "committed offsets")
    assert pending_replay > 0, "the kill did not land between the Postgres commit and the offset commit"
    assert in_db < N, "the kill did not land mid-stream"
    assert out.clean(), out.report()
    assert second.alive and worker.alive, process_report([second, worker])
