"""Events that pass validation but that the store refuses (real broker, real Postgres): each goes to the
dead-letter topic with the database's reason, the rest of its batch is written, the partition moves on."""
from __future__ import annotations

import json
import uuid
from contextlib import contextmanager

import psycopg
import pytest
from kafka import KafkaProducer

from model.manifest import read_manifest
from model.registry import promote, register_candidate
from tests.worker.conftest import make_settings
from tests.worker.test_intake import KAFKA_TEST, _drain, _event
from tests.worker.test_intake_pipeline import _committed
from worker.intake import MAX_REPLAYS, CorrectionsIntake, Intake, make_consumer


def _produce_one_partition(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for key, value in items:
        producer.send(topic, key=key, value=value, partition=0)
    producer.flush()
    producer.close()


@contextmanager
def refused_by_database(db, listing_id: str, errcode: str | None):
    """A trigger that makes Postgres refuse one listing's row, as a constraint or a bad value would.
    ``errcode``: its SQLSTATE name (None: a plain RAISE, an error of no known kind)."""
    using = f" USING ERRCODE = '{errcode}'" if errcode else ""
    db.execute(f"""CREATE OR REPLACE FUNCTION refuse_poison() RETURNS trigger AS $$
                   BEGIN IF NEW.listing_id = '{listing_id}' THEN
                     RAISE EXCEPTION 'listing % refused by a test constraint', NEW.listing_id{using};
                   END IF; RETURN NEW; END $$ LANGUAGE plpgsql""")
    db.execute("CREATE TRIGGER refuse_poison BEFORE INSERT ON listings FOR EACH ROW EXECUTE FUNCTION refuse_poison()")
    try:
        yield
    finally:
        db.execute("DROP TRIGGER IF EXISTS refuse_poison ON listings")
        db.execute("DROP FUNCTION IF EXISTS refuse_poison()")


def _listing_intake(settings, pg_url, enqueued, group) -> Intake:
    return Intake(settings, lambda: psycopg.connect(pg_url, autocommit=True), enqueued.append,
                  consumer=make_consumer(settings, settings.listings_topic, group, **KAFKA_TEST), poll_timeout_ms=200)


@pytest.mark.parametrize("errcode, replays", [("check_violation", 0), (None, MAX_REPLAYS)],
                         ids=["permanent", "unknown-kind"])
def test_write_time_poison_is_dead_lettered_and_the_partition_moves_on(kafka_bootstrap, pg_url, db, errcode,
                                                                         replays):
    topic = f"listings-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, listings_topic=topic, dlq_topic=topic + ".dlq",
                             task_listings=16)
    items = [(f"l{i}".encode(), _event(f"l{i}")) for i in range(100)]
    poison = items[50]
    _produce_one_partition(kafka_bootstrap, topic, items)

    enqueued: list[list[str]] = []
    with refused_by_database(db, "l50", errcode):
        stats = _listing_intake(settings, pg_url, enqueued, "g").run(idle_exit_s=4)

    ids = {r[0] for r in db.execute("SELECT listing_id FROM listings").fetchall()}
    assert ids == {f"l{i}" for i in range(100)} - {"l50"}
    assert sorted(i for chunk in enqueued for i in chunk) == sorted(ids)  # every good one enqueued once
    assert stats.errors == replays  # a permanent refusal is not replayed; an unknown one a bounded number of times
    dead = _drain(kafka_bootstrap, topic + ".dlq", 1)
    assert [(m.key, m.value) for m in dead] == [poison]  # the raw bytes
    headers = dict(dead[0].headers)
    assert headers["dlq_reason"] == b"db_refused"
    assert b"refused by a test constraint" in headers["dlq_detail"]
    assert headers["source_offset"] == b"50"
    assert _committed(kafka_bootstrap, topic, "g") == {0: 100}  # committed past it


def test_nul_character_is_refused_at_validation(kafka_bootstrap, pg_url, db):
    topic = f"listings-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, listings_topic=topic, dlq_topic=topic + ".dlq")
    nul = [(b"n1", _event("n1", title="bad\u0000title")), (b"n2", _event("n2", attributes={"colour": "re\u0000d"})),
           (b"n3", _event("n3", images=["s3://b/k\u0000"]))]
    _produce_one_partition(kafka_bootstrap, topic, [*nul, (b"ok", _event("ok"))])
    enqueued: list[list[str]] = []
    stats = _listing_intake(settings, pg_url, enqueued, "g").run(max_events=4, idle_exit_s=4)
    assert stats.dlq_reasons == {"invalid": 3} and stats.errors == 0
    assert enqueued == [["ok"]]
    dead = _drain(kafka_bootstrap, topic + ".dlq", 3)
    assert all(b"NUL" in dict(m.headers)["dlq_detail"] for m in dead)


def test_transient_write_failure_replays_and_commits_only_after_the_write(kafka_bootstrap, pg_url, db):
    topic = f"listings-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, listings_topic=topic, dlq_topic=topic + ".dlq")
    _produce_one_partition(kafka_bootstrap, topic, [(b"t1", _event("t1")), (b"t2", _event("t2"))])
    conns = []

    def connect():
        conn = psycopg.connect(pg_url, autocommit=True)
        if not conns:  # the first connection dies before its first write, as when Postgres restarts
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        conns.append(conn)
        return conn

    intake = Intake(settings, connect, lambda ids: None,
                    consumer=make_consumer(settings, topic, "g", **KAFKA_TEST), poll_timeout_ms=200)
    commits = []
    original = intake._commit

    def commit(prepared):
        rows = db.execute("SELECT count(*) FROM listings").fetchone()[0]
        commits.append(({tp.partition: off for tp, off in prepared.next.items()}, rows))
        original(prepared)

    intake._commit = commit
    stats = intake.run(idle_exit_s=4)
    assert stats.errors == 1 and stats.dlq == 0 and len(conns) == 2  # replayed on a new connection
    assert commits == [({0: 2}, 2)]  # one commit, made after both rows existed; none for the failed write
    assert _committed(kafka_bootstrap, topic, "g") == {0: 2}


def _correction(event_id: str, listing_id: str, group: str, value: str) -> bytes:
    return json.dumps(dict(event_id=event_id, listing_id=listing_id, group=group, new_value=value,
                           corrected_by="mod", corrected_at="2026-01-01T00:00:00Z")).encode()


def test_corrections_to_unknown_listings_groups_or_values_are_dead_lettered(kafka_bootstrap, pg_url, db, model_dir):
    register_candidate(db, model_dir, actor="test")
    promote(db, read_manifest(model_dir).model_version, actor="test")
    db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash) VALUES ('c1', 's', '{}', 'h')")
    topic = f"corrections-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, corrections_topic=topic)
    items = [(b"k1", _correction("k1", "c1", "category", "Dress")),        # good
             (b"k2", _correction("k2", "nope", "category", "Dress")),      # unknown listing
             (b"k3", _correction("k3", "c1", "sleeve_length", "long")),    # group the taxonomy lacks
             (b"k4", _correction("k4", "c1", "category", "Spacesuit")),    # value the group lacks
             (b"k5", _correction("k5", "c1", "colour", "blue\u0000")),     # NUL
             (b"k6", _correction("k6", "c1", "colour", "blue"))]           # good
    _produce_one_partition(kafka_bootstrap, topic, items)
    intake = CorrectionsIntake(settings, lambda: psycopg.connect(pg_url, autocommit=True),
                               consumer=make_consumer(settings, topic, "gc", **KAFKA_TEST), poll_timeout_ms=200)
    stats = intake.run(idle_exit_s=4)
    assert stats.dlq_reasons == {"unknown_listing": 1, "unknown_group": 1, "unknown_value": 1, "invalid": 1}
    assert stats.upserted == 2
    assert db.execute("SELECT tag_group, value FROM listing_tags ORDER BY 1").fetchall() == [
        ("category", "Dress"), ("colour", "blue")]
    assert [r[0] for r in db.execute("SELECT event_id FROM corrections ORDER BY 1").fetchall()] == ["k1", "k6"]
    dead = {m.key: dict(m.headers) for m in _drain(kafka_bootstrap, topic + ".dlq", 4)}
    assert dead[b"k2"]["dlq_reason"] == b"unknown_listing"
    assert dead[b"k3"]["dlq_reason"] == b"unknown_group" and b"sleeve_length" in dead[b"k3"]["dlq_detail"]
    assert dead[b"k4"]["dlq_reason"] == b"unknown_value" and b"Spacesuit" in dead[b"k4"]["dlq_detail"]
    assert _committed(kafka_bootstrap, topic, "gc") == {0: 6}
