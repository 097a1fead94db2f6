"""Fault 6: the Kafka-protocol broker hangs for 30 s (SIGSTOP, then SIGCONT) in the middle of a run: its
connections stay open and nothing answers, longer than the consumer's session timeout (6 s). A private
Tansu: the shared broker is never touched.

Backpressure keeps the consumer mid-topic when the broker stops; afterwards it must rejoin its group, replay
what it had not committed and go on, and poison met after the hang must still reach the DLQ.
"""
from __future__ import annotations

from tests.faults.cluster import count_enriched, mixed_listings, outcome, process_report, produce, wait_for, \
    wait_settled

N = 800
HANG_S = 30


def test_kafka_broker_hung_30s(make_stack, private_kafka):
    stack = make_stack(kafka=private_kafka.bootstrap, max_queue_depth=4)
    records, good, poison = mixed_listings("kh", N, stack.images)
    produce(stack.kafka, stack.topic, records)
    worker, consumer = stack.worker(), stack.consumer()
    wait_for(lambda: count_enriched(stack.pg_url) >= N // 4, 180, "a quarter enriched", [worker, consumer])
    hung_at = count_enriched(stack.pg_url)
    private_kafka.hang(HANG_S)
    print(f"broker hung {HANG_S}s with {hung_at} enriched, {count_enriched(stack.pg_url)} after")
    done = wait_settled(stack.pg_url, good, procs=[worker, consumer])
    out = outcome(stack.pg_url, good, "kafka broker hung 30s", stack.kafka, stack.dlq_topic, poison)
    assert hung_at < N, "the hang did not land mid-stream"
    assert done and not out.problems(), out.report()
    assert worker.alive and consumer.alive, process_report([worker, consumer])
