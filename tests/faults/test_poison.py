"""Fault 8: poison of every kind among good events, all on one partition (so each poison event sits between
good ones the intake must not give up): not JSON, wrong types, unknown field, oversized, wrong schema version,
NUL in a string, empty, and valid JSON the database refuses (SQLSTATE class 22 and a CHECK constraint, see
cluster.install_refusals); the same for corrections, plus corrections to an unknown listing, group or value.
"""
from __future__ import annotations

import psycopg

from tests.faults.cluster import (CORRECTION_POISON, LISTING_POISON, correction_event, encode, install_refusals,
                                  mixed_listings, outcome, poison_correction, process_report, produce, read_topic,
                                  wait_for, wait_settled)

N = 300
MAX_BYTES = 4096  # ENRICH_MAX_EVENT_BYTES: an oversized event stays small
# what the database said, as the DLQ's dlq_detail must carry it
DB_MESSAGES = ("unsupported Unicode escape sequence", "fault_refuse_check")


def _dlq(bootstrap: str, topic: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in read_topic(bootstrap, topic):
        out.setdefault(r.key.decode(), []).append(r)
    return out


def _headers(record) -> dict[str, str]:
    return {k: v.decode(errors="replace") for k, v in record.headers}


def test_listing_poison_of_every_kind_on_one_partition(make_stack):
    stack = make_stack(max_event_bytes=MAX_BYTES)
    install_refusals(stack.pg_url)
    records, good, poison = mixed_listings("po", N, stack.images, every=10, kinds=tuple(LISTING_POISON),
                                           max_bytes=MAX_BYTES)
    assert set(poison.values()) == set(LISTING_POISON.values())
    produce(stack.kafka, stack.topic, records, partition=0)
    worker, consumer = stack.worker(), stack.consumer()
    done = wait_settled(stack.pg_url, good, procs=[worker, consumer])
    wait_for(lambda: len(read_topic(stack.kafka, stack.dlq_topic)) >= len(poison), 60, "every poison event in the DLQ",
             [consumer])
    out = outcome(stack.pg_url, good, "listing poison", stack.kafka, stack.dlq_topic, poison)
    assert done and not out.problems(dlq_exactly_once=True), out.report()

    sent = dict(records)
    for key, [record] in _dlq(stack.kafka, stack.dlq_topic).items():
        headers = _headers(record)
        assert record.value == (sent[key] or b""), f"{key}: the DLQ keeps the original bytes"
        assert (headers["source_topic"], headers["source_partition"]) == (stack.topic, "0")
        if headers["dlq_reason"] == "db_refused":
            assert any(m in headers["dlq_detail"] for m in DB_MESSAGES), headers
    with psycopg.connect(stack.pg_url) as conn:
        stored = {r[0] for r in conn.execute("SELECT listing_id FROM listings").fetchall()}
    assert not stored & set(poison), "a poison event reached the listings table"
    assert worker.alive and consumer.alive, process_report([worker, consumer])


def test_correction_poison_of_every_kind_on_one_partition(make_stack, fault_model_dir):
    from model.registry import promote, register_candidate

    stack = make_stack(max_event_bytes=MAX_BYTES)
    install_refusals(stack.pg_url)
    with psycopg.connect(stack.pg_url, autocommit=True) as conn:  # corrections are checked against its taxonomy
        promote(conn, register_candidate(conn, fault_model_dir).model_version)
    records, listings, _ = mixed_listings("cl", 120, stack.images, every=0)
    produce(stack.kafka, stack.topic, records)
    worker, consumer = stack.worker(), stack.consumer()
    assert wait_settled(stack.pg_url, listings, procs=[worker, consumer])

    colours = ["black", "white", "red", "green", "blue", "yellow", "purple", "orange"]
    corrections, good, poison = [], {}, {}
    for i, lid in enumerate(listings):
        key = f"corr-{i:04d}"
        corrections.append((key, encode(correction_event(key, lid, "colour", colours[i % len(colours)]))))
        good[key] = (lid, colours[i % len(colours)])
        if i % 10 == 9:
            kind = list(CORRECTION_POISON)[(i // 10) % len(CORRECTION_POISON)]
            pkey = f"corr-poison-{kind}-{i:04d}"
            corrections.append((pkey, poison_correction(kind, pkey, lid, MAX_BYTES)))
            poison[pkey] = CORRECTION_POISON[kind]
    assert set(poison.values()) == set(CORRECTION_POISON.values())
    produce(stack.kafka, stack.corrections_topic, corrections, partition=0)
    corr = stack.corrections()

    def applied() -> int:
        with psycopg.connect(stack.pg_url) as conn:
            return conn.execute("SELECT count(*) FROM corrections").fetchone()[0]

    wait_for(lambda: applied() >= len(good), 120, "every good correction stored", [corr])
    wait_for(lambda: len(read_topic(stack.kafka, stack.corrections_dlq_topic)) >= len(poison), 60,
             "every poison correction in the DLQ", [corr])
    out = outcome(stack.pg_url, listings, "correction poison", stack.kafka, stack.corrections_dlq_topic, poison)
    with psycopg.connect(stack.pg_url) as conn:
        stored = dict(((r[0]), (r[1], r[2])) for r in conn.execute(
            "SELECT event_id, listing_id, new_value FROM corrections").fetchall())
        tags = dict(((r[0]), (r[1], r[2])) for r in conn.execute(
            "SELECT listing_id, value, source FROM listing_tags WHERE tag_group = 'colour'").fetchall())
    print(f"corrections: produced={len(good)} stored={len(stored)} poison={len(poison)} dlq={out.dlq_count}")
    assert not out.problems(dlq_exactly_once=True), out.report()  # incl. a corrected tag written twice
    assert stored == good, "exactly the good corrections are stored"
    assert all(tags[lid] == (value, "corrected") for lid, value in good.values()), "corrections are the tags now"
    for key, [record] in _dlq(stack.kafka, stack.corrections_dlq_topic).items():
        headers = _headers(record)
        if headers["dlq_reason"] == "db_refused":
            assert any(m in headers["dlq_detail"] for m in DB_MESSAGES), headers
    assert corr.alive and worker.alive and consumer.alive, process_report([corr, worker, consumer])
