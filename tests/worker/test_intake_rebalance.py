"""Back-pressure and rebalances against the real broker and Postgres: partitions a rebalance hands to a paused
intake stay paused, nothing a poll returns is dropped, and the queue-depth limit holds within one batch."""
from __future__ import annotations

import threading
import time
import uuid

import psycopg
from kafka import KafkaProducer

from tests.worker.conftest import make_settings, wait_until
from tests.worker.test_intake import KAFKA_TEST, _event
from tests.worker.test_intake_pipeline import _committed
from worker.intake import Intake, make_consumer

N = 400


def _produce_spread(bootstrap: str, topic: str, n: int) -> None:
    """n listing events over the topic's 4 partitions (auto-created)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(n):
        producer.send(topic, key=f"r{i}".encode(), value=_event(f"r{i}"), partition=i % 4)
    producer.flush()
    producer.close()


def _intake(settings, pg_url, enqueued, depth, **consumer_kw) -> Intake:
    consumer = make_consumer(settings, settings.listings_topic, settings.consumer_group, **KAFKA_TEST, **consumer_kw)
    return Intake(settings, lambda: psycopg.connect(pg_url, autocommit=True), enqueued.append, queue_depth=depth,
                  consumer=consumer, poll_timeout_ms=200)


def _run_in_thread(intake: Intake, **kw) -> threading.Thread:
    thread = threading.Thread(target=intake.run, kwargs=kw, daemon=True)
    thread.start()
    return thread


def _paused_intake(kafka_bootstrap, pg_url):
    """N events on a new topic; an intake running in a thread, paused (a full queue) until `full` is cleared and
    holding all 4 partitions. Returns (settings, intake, its enqueued chunks, its thread, full)."""
    topic = f"listings-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, listings_topic=topic, dlq_topic=topic + ".dlq",
                             consumer_group=f"g-{uuid.uuid4().hex[:6]}", max_queue_depth=2)
    _produce_spread(kafka_bootstrap, topic, N)
    full = threading.Event()
    full.set()
    enqueued: list[list[str]] = []
    intake = _intake(settings, pg_url, enqueued, lambda: 100 if full.is_set() else 0)
    thread = _run_in_thread(intake, idle_exit_s=4)
    wait_until(lambda: len(intake.consumer.assignment()) == 4)
    return settings, intake, enqueued, thread, full


def _all_ingested(kafka_bootstrap, db, settings, thread) -> None:
    thread.join(120)
    assert not thread.is_alive()
    assert db.execute("SELECT count(*) FROM listings").fetchone()[0] == N
    assert sum(_committed(kafka_bootstrap, settings.listings_topic, settings.consumer_group).values()) == N


def test_partitions_assigned_while_paused_stay_paused_and_nothing_is_dropped(kafka_bootstrap, pg_url, db):
    """The intake pauses before its first poll; the poll that joins the group assigns partitions, which Kafka
    does not pause: their records must not be consumed and dropped while paused."""
    settings, intake, enqueued, thread, full = _paused_intake(kafka_bootstrap, pg_url)
    time.sleep(2)  # several paused polls with every partition assigned
    assert enqueued == [] and intake.stats.consumed == 0
    full.clear()  # the queue drained
    _all_ingested(kafka_bootstrap, db, settings, thread)


def test_peer_leaving_while_paused_loses_nothing(kafka_bootstrap, pg_url, db):
    """Two members on 4 partitions; one flows, the other is paused; the flowing one leaves without committing
    what it had read: the paused one takes its partitions over, paused, and later ingests every event."""
    settings, paused, paused_out, paused_thread, full = _paused_intake(kafka_bootstrap, pg_url)

    # the peer joins (a rebalance: 2 + 2), reads a little of its partitions, then dies without a commit
    peer = make_consumer(settings, settings.listings_topic, settings.consumer_group, **KAFKA_TEST, max_poll_records=10)
    # the paused member learns of the rebalance at its own next poll: wait for both sides, not only the peer
    wait_until(lambda: peer.poll(timeout_ms=200) is not None and len(peer.assignment()) == 2
               and len(paused.consumer.assignment()) == 2)
    peer.poll(timeout_ms=500)
    peer.close(autocommit=False)  # leaves the group: the paused intake gets all 4 partitions again

    wait_until(lambda: len(paused.consumer.assignment()) == 4)
    time.sleep(2)  # paused polls with the handed-over partitions assigned
    assert paused_out == []
    full.clear()
    _all_ingested(kafka_bootstrap, db, settings, paused_thread)


def test_queue_depth_limit_holds_within_one_batch(kafka_bootstrap, pg_url, db):
    """A queue that never drains: the intake enqueues at most one polled batch's tasks beyond the limit, although
    it reads the broker's queue depth at most once a second."""
    topic = f"listings-{uuid.uuid4().hex[:8]}"
    limit, per_poll, task_listings = 5, 40, 8
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, listings_topic=topic, dlq_topic=topic + ".dlq",
                             consumer_group=f"g-{uuid.uuid4().hex[:6]}", max_queue_depth=limit,
                             task_listings=task_listings)
    _produce_spread(kafka_bootstrap, topic, N)
    enqueued: list[list[str]] = []
    intake = _intake(settings, pg_url, enqueued, lambda: len(enqueued), max_poll_records=per_poll)
    thread = _run_in_thread(intake)
    try:
        wait_until(lambda: intake.paused and not intake._inflight)
        time.sleep(2.5)  # more depth reads while paused: nothing more may be enqueued
        tasks = len(enqueued)
    finally:
        intake.stop()
        thread.join(60)
    assert 0 < tasks <= limit + per_poll // task_listings
    assert sum(len(chunk) for chunk in enqueued) < N
