"""Under a steady trickle of events the intake lingers (ENRICH_INTAKE_LINGER_MS) to fill tasks, and sends a task
as soon as it is full, against the real Kafka-protocol broker and Postgres."""
from __future__ import annotations

import threading
import time
import uuid

from kafka import KafkaProducer

from harness.cluster import create_topic
from tests.worker.conftest import make_settings
from tests.worker.test_intake import _event, _intake
from worker.intake import Stats

TASK = 16
EVENTS = 3 * TASK


def _trickle(kafka_bootstrap: str, pg_url: str, linger_ms: int) -> tuple[list[list[str]], int]:
    """EVENTS events, one every 50 ms, into a fresh one-partition topic an intake has already joined; returns
    the tasks it enqueued and the batches it wrote (one per fill)."""
    topic = f"linger-{uuid.uuid4().hex[:8]}"
    create_topic(kafka_bootstrap, topic, partitions=1)
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, listings_topic=topic, dlq_topic=topic + ".dlq",
                             task_listings=TASK, intake_linger_ms=linger_ms)
    enqueued: list[list[str]] = []
    intake = _intake(settings, pg_url, enqueued, f"g-{topic}")
    while not intake.consumer.assignment():  # joined before the first event, so nothing arrives in a heap
        intake.consumer.poll(timeout_ms=500)
    stats: dict[str, Stats] = {}
    runner = threading.Thread(target=lambda: stats.update(s=intake.run(max_events=EVENTS, idle_exit_s=15)))
    runner.start()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(EVENTS):
        producer.send(topic, key=f"t{i}".encode(), value=_event(f"{topic}-{i:02d}"))
        producer.flush()
        time.sleep(0.05)
    producer.close()
    runner.join(120)
    assert not runner.is_alive()
    assert sorted(i for task in enqueued for i in task) == [f"{topic}-{i:02d}" for i in range(EVENTS)]
    return enqueued, stats["s"].batches


def test_a_trickle_fills_whole_tasks_each_sent_once_full(kafka_bootstrap, pg_url, db):
    # a bound far above the trickle's 0.8 s per task: every task waits only until it is full
    tasks, batches = _trickle(kafka_bootstrap, pg_url, linger_ms=10_000)
    assert [len(t) for t in tasks] == [TASK] * 3
    assert batches == 3  # sent when full, not after the bound with everything that came meanwhile


def test_without_lingering_a_trickle_makes_small_tasks(kafka_bootstrap, pg_url, db):
    tasks, batches = _trickle(kafka_bootstrap, pg_url, linger_ms=0)
    assert len(tasks) > 3 and batches > 3
