"""The intake's two stages (validate and dead-letter | upsert and enqueue, in a writer thread) against the
real broker and Postgres: offsets only ever move past batches that are written and enqueued, a failed
batch is replayed together with the batches handed over behind it, and a stop finishes what is in flight."""
from __future__ import annotations

import threading
import time
import uuid

import psycopg
from kafka import KafkaConsumer, TopicPartition

from tests.worker.conftest import make_settings
from tests.worker.test_intake import KAFKA_TEST, _drain, _event, _produce
from worker.intake import Intake, make_consumer


def _committed(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """partition → the group's committed offset (partitions without one left out)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        out = {p: consumer.committed(TopicPartition(topic, p)) for p in consumer.partitions_for_topic(topic)}
        return {p: o for p, o in out.items() if o is not None}
    finally:
        consumer.close()


def _positions(bootstrap: str, topic: str, n: int) -> dict[tuple[int, int], bytes]:
    """(partition, offset) → key of every event on the topic, as the broker placed them."""
    return {(m.partition, m.offset): m.key for m in _drain(bootstrap, topic, n)}


def _listing_ids(pg_url: str) -> set[str]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT listing_id FROM listings").fetchall()}


def _small_batches(settings, topic: str, group: str):
    """Batches of at most 5 events (settings with intake_linger_ms=0: no lingering joins them into one)."""
    return make_consumer(settings, topic, group, max_poll_records=5, **KAFKA_TEST)


def test_offsets_move_only_past_written_batches_and_a_failure_replays_those_behind_it(kafka_bootstrap, pg_url, db):
    topic = f"listings-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, listings_topic=topic, dlq_topic=topic + ".dlq",
                             intake_linger_ms=0)
    items = [(f"p{i:02d}".encode(), _event(f"p{i:02d}")) for i in range(40)]
    items.insert(12, (b"bad", b"{not json"))
    _produce(kafka_bootstrap, topic, items)
    placed = {pos: key.decode() for pos, key in _positions(kafka_bootstrap, topic, len(items)).items()
              if key != b"bad"}
    ends: dict[int, int] = {}
    for p, o in _positions(kafka_bootstrap, topic, len(items)):
        ends[p] = max(ends.get(p, 0), o + 1)

    enqueued: list[str] = []
    calls = {"n": 0}

    def enqueue(ids: list[str]) -> None:
        calls["n"] += 1
        time.sleep(0.05)  # a broker slower than the fetch: later batches queue up behind this one
        if calls["n"] == 3:
            raise ConnectionError("broker down")
        enqueued.extend(ids)

    group = f"g-{uuid.uuid4().hex[:6]}"
    intake = Intake(settings, lambda: psycopg.connect(pg_url, autocommit=True), enqueue,
                    consumer=_small_batches(settings, topic, group), poll_timeout_ms=200)
    commits: list[int] = []
    violations: list[str] = []
    real_commit = intake.consumer.commit

    def checking_commit(offsets=None, **kwargs):
        stored, done = _listing_ids(pg_url), set(enqueued)
        for tp, meta in offsets.items():
            below = {lid for (p, o), lid in placed.items() if p == tp.partition and o < meta.offset}
            if not below <= stored or not below <= done:
                violations.append(f"{tp} committed to {meta.offset} before {sorted(below - (stored & done))}")
            commits.append((tp.partition, meta.offset))
        return real_commit(offsets, **kwargs)

    intake.consumer.commit = checking_commit
    stats = intake.run(idle_exit_s=4)

    assert stats.errors == 1 and stats.dlq >= 1
    assert violations == []
    for p in ends:  # per partition, the commit only moves forward, to the end
        mine = [o for q, o in commits if q == p]
        assert mine == sorted(mine) and mine[-1] == ends[p]
    assert _listing_ids(pg_url) == set(placed.values()) == set(enqueued)
    assert stats.consumed > len(items)  # the failed batch and those behind it were read again
    assert _committed(kafka_bootstrap, topic, group) == ends
    assert [m.key for m in _drain(kafka_bootstrap, topic + ".dlq", 1)] == [b"bad"]


def test_stop_finishes_the_batches_in_flight_and_a_restart_continues_from_the_commit(kafka_bootstrap, pg_url, db):
    topic = f"listings-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, listings_topic=topic, dlq_topic=topic + ".dlq",
                             intake_linger_ms=0)
    ids = [f"s{i:02d}" for i in range(30)]
    _produce(kafka_bootstrap, topic, [(i.encode(), _event(i)) for i in ids])
    placed = {pos: key.decode() for pos, key in _positions(kafka_bootstrap, topic, len(ids)).items()}
    group = f"g-{uuid.uuid4().hex[:6]}"
    first: list[str] = []
    handed_over = threading.Event()

    def enqueue_then_stop(chunk: list[str]) -> None:
        first.extend(chunk)
        if not handed_over.is_set():
            handed_over.set()
            time.sleep(0.5)  # the consumer thread hands the next batch over meanwhile
            intake.stop()     # SIGTERM while batches are in flight

    intake = Intake(settings, lambda: psycopg.connect(pg_url, autocommit=True), enqueue_then_stop,
                    consumer=_small_batches(settings, topic, group), poll_timeout_ms=200)
    stats = intake.run(idle_exit_s=10)
    committed = _committed(kafka_bootstrap, topic, group)
    assert stats.batches >= 2  # the batch waiting behind the first was finished too
    # everything handed over was written and committed; nothing beyond the commit was written
    below = {lid for (p, o), lid in placed.items() if o < committed.get(p, 0)}
    assert _listing_ids(pg_url) == below == set(first)
    assert 0 < len(below) < len(ids)

    second: list[str] = []
    restart = Intake(settings, lambda: psycopg.connect(pg_url, autocommit=True), second.extend,
                     consumer=_small_batches(settings, topic, group), poll_timeout_ms=200)
    restart.run(idle_exit_s=4)
    assert _listing_ids(pg_url) == set(ids)
    assert sorted(first + second) == ids  # each listing enqueued once across the two runs
