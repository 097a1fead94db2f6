"""Intake against the real Kafka-protocol broker and Postgres: rows out, DLQ, replays, offsets."""
from __future__ import annotations

import json
import uuid

import psycopg
from kafka import KafkaConsumer, KafkaProducer

from tests.worker.conftest import make_settings
from worker.intake import CorrectionsIntake, Intake, make_consumer, parse_listing

KAFKA_TEST = dict(session_timeout_ms=6000, heartbeat_interval_ms=500)


def _event(lid: str, **kw) -> bytes:
    body = dict(listing_id=lid, seller_id="s1", images=[f"/x/{lid}.png"])
    body.update(kw)
    return json.dumps(body).encode()


def _produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for key, value in items:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def _intake(settings, pg_url, enqueued, group, **kw) -> Intake:
    consumer = make_consumer(settings, settings.listings_topic, group, **KAFKA_TEST)
    return Intake(settings, lambda: psycopg.connect(pg_url, autocommit=True), enqueued.append,
                  consumer=consumer, poll_timeout_ms=200, **kw)


def _drain(bootstrap: str, topic: str, n: int):
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=8000, group_id=None)
    out = []
    for msg in consumer:
        out.append(msg)
        if len(out) >= n:
            break
    consumer.close()
    return out


def test_parse_listing_reasons():
    assert parse_listing(b"", 1000).reason == "empty"
    assert parse_listing(b"{nope", 1000).reason == "not_json"
    assert parse_listing(b'{"listing_id": "x"}', 1000).reason == "invalid"
    assert parse_listing(b"x" * 2000, 1000).reason == "oversized"
    assert parse_listing(_event("ok"), 1000).listing_id == "ok"
    # no store can hold these: refused at the door, with a reason
    nul = parse_listing(_event("n", title="a\u0000b"), 1000)
    assert nul.reason == "invalid" and "title: Value error, contains a NUL character" in nul.detail
    surrogate = parse_listing(_event("s").replace(b'"s1"', b'"s\\ud800"'), 1000)
    assert surrogate.reason == "not_json"
    assert parse_listing(_event("u").replace(b'"s1"', b'"s\xed\xa0\x80"'), 1000).reason == "not_json"


def test_events_in_rows_out_poison_to_dlq_duplicates_no_extra_rows(kafka_bootstrap, pg_url, db):
    topic = f"listings-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, listings_topic=topic, dlq_topic=topic + ".dlq",
                             max_event_bytes=2048, task_listings=2)
    good = [(f"l{i}".encode(), _event(f"l{i}")) for i in range(5)]
    poison = [(b"p1", b"\xff\xfe not json"), (b"p2", json.dumps({"listing_id": "p2"}).encode()),
              (b"p3", _event("p3", title="x" * 3000))]
    duplicates = [(b"l1", _event("l1")), (b"l2", _event("l2", event_id="other-id"))]
    _produce(kafka_bootstrap, topic, good + poison + duplicates)

    enqueued: list[list[str]] = []
    stats = _intake(settings, pg_url, enqueued, "g1").run(max_events=10, idle_exit_s=5)
    assert stats.consumed == 10 and stats.dlq == 3
    assert stats.dlq_reasons == {"not_json": 1, "invalid": 1, "oversized": 1}
    assert db.execute("SELECT count(*) FROM listings").fetchone()[0] == 5
    assert all(len(chunk) <= 2 for chunk in enqueued)
    assert sorted({i for chunk in enqueued for i in chunk}) == [f"l{i}" for i in range(5)]

    dead = _drain(kafka_bootstrap, topic + ".dlq", 3)
    by_key = {m.key: m for m in dead}
    assert by_key[b"p1"].value == b"\xff\xfe not json"  # original bytes kept
    assert dict(by_key[b"p3"].headers)["dlq_reason"] == b"oversized"
    assert dict(by_key[b"p2"].headers)["dlq_reason"] == b"invalid"

    # offsets were committed: the same group sees nothing new
    again: list[list[str]] = []
    stats2 = _intake(settings, pg_url, again, "g1").run(idle_exit_s=4)
    assert stats2.consumed == 0 and again == []

    # a full replay (new group, e.g. offsets lost) changes no rows; done listings are not re-enqueued
    db.execute("UPDATE listings SET status = 'enriched', enriched_hash = content_hash WHERE listing_id <> 'l4'")
    replay: list[list[str]] = []
    stats3 = _intake(settings, pg_url, replay, "g2").run(max_events=10, idle_exit_s=5)
    assert stats3.upserted == 0
    assert [i for chunk in replay for i in chunk] == ["l4"]
    assert db.execute("SELECT count(*) FROM listings").fetchone()[0] == 5


def test_edit_is_reenriched(kafka_bootstrap, pg_url, db):
    topic = f"listings-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, listings_topic=topic, dlq_topic=topic + ".dlq")
    _produce(kafka_bootstrap, topic, [(b"e1", _event("e1"))])
    first: list[list[str]] = []
    _intake(settings, pg_url, first, "g").run(max_events=1, idle_exit_s=5)
    db.execute("UPDATE listings SET status = 'enriched', enriched_hash = content_hash")
    _produce(kafka_bootstrap, topic, [(b"e1", _event("e1", title="now with a title"))])
    second: list[list[str]] = []
    stats = _intake(settings, pg_url, second, "g").run(max_events=1, idle_exit_s=5)
    assert stats.upserted == 1 and second == [["e1"]]
    assert db.execute("SELECT status, event->>'title' FROM listings").fetchone() == ("pending", "now with a title")


def test_failed_database_write_replays_without_committing(kafka_bootstrap, pg_url, db):
    topic = f"listings-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, listings_topic=topic, dlq_topic=topic + ".dlq")
    _produce(kafka_bootstrap, topic, [(b"f1", _event("f1"))])
    calls = []

    def flaky_enqueue(ids):
        calls.append(ids)
        if len(calls) == 1:
            raise ConnectionError("broker down")  # first enqueue fails: offset must not move

    intake = Intake(settings, lambda: psycopg.connect(pg_url, autocommit=True), flaky_enqueue,
                    consumer=make_consumer(settings, topic, "g", **KAFKA_TEST), poll_timeout_ms=200)
    stats = intake.run(max_events=2, idle_exit_s=5)
    assert stats.errors == 1 and calls == [["f1"], ["f1"]]  # replayed and enqueued again after the failure
    assert db.execute("SELECT count(*) FROM listings").fetchone()[0] == 1


def test_backpressure_pauses_polling(kafka_bootstrap, pg_url, db):
    topic = f"listings-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, listings_topic=topic, max_queue_depth=10)
    _produce(kafka_bootstrap, topic, [(b"b1", _event("b1"))])
    depth = {"n": 50}
    enqueued: list[list[str]] = []
    intake = _intake(settings, pg_url, enqueued, "g", queue_depth=lambda: depth["n"])
    intake.consumer.poll(timeout_ms=4000)  # join the group (may already fetch; seek back below)
    intake.consumer.seek_to_beginning()
    polls = {"n": 0}
    original = intake._backpressure

    def counting():
        polls["n"] += 1
        if polls["n"] == 8:
            depth["n"] = 0  # the queue drained
        return original()

    intake._backpressure = counting
    stats = intake.run(max_events=1, idle_exit_s=5)
    assert stats.paused_s > 0 and polls["n"] >= 8
    assert enqueued == [["b1"]]


def test_corrections_consumer(kafka_bootstrap, pg_url, db):
    topic = f"corrections-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, corrections_topic=topic)
    db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash) VALUES ('c1', 's', '{}', 'h')")
    corr = dict(event_id="k1", listing_id="c1", group="colour", new_value="blue", corrected_by="mod",
                corrected_at="2026-01-01T00:00:00Z")
    _produce(kafka_bootstrap, topic, [(b"c1", json.dumps(corr).encode()), (b"c1", json.dumps(corr).encode()),
                                      (b"c1", b"{}")])
    intake = CorrectionsIntake(settings, lambda: psycopg.connect(pg_url, autocommit=True),
                               consumer=make_consumer(settings, topic, "gc", **KAFKA_TEST), poll_timeout_ms=200)
    stats = intake.run(max_events=3, idle_exit_s=5)
    assert stats.dlq == 1 and stats.upserted == 1
    assert db.execute("SELECT value, source FROM listing_tags").fetchall() == [("blue", "corrected")]
    assert db.execute("SELECT count(*) FROM corrections").fetchone()[0] == 1
