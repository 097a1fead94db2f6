"""Fault 8: poison of every kind among good events, all on one partition (so each poison event sits between
good ones the intake must not give up): not JSON, wrong types, unknown field, oversized, wrong schema version,
NUL in a string, a lone surrogate, empty, and valid JSON the database refuses (SQLSTATE class 22 and a CHECK
constraint, see cluster.install_refusals); the same for corrections, plus corrections to an unknown listing,
group or value. Each poison event must be in the DLQ exactly once, with its reason and its original bytes.
"""
from __future__ import annotations

import psycopg

from harness.cluster import (
    CORRECTION_POISON,
    LISTING_POISON,
    correction_event,
    encode,
    install_refusals,
    mixed_listings,
    outcome,
    poison_correction,
    process_report,
    produce,
    read_topic,
    settle,
    wait_for,
)
from model.registry import promote, register_candidate
from schemas.events import ListingEvent
from worker.store import upsert_listings

N = 300
MAX_BYTES = 4096  # ENRICH_MAX_EVENT_BYTES: an oversized event stays small


def _db_message(key: str) -> str:
    """What the database said about a db_refused_* poison event, as its dlq_detail must carry it."""
    return "unsupported Unicode escape sequence" if "db_refused_22" in key else "fault_refuse_check"


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
    stuck = settle(stack.pg_url, good, procs=[worker, consumer])
    wait_for(lambda: len(read_topic(stack.kafka, stack.dlq_topic)) >= len(poison), 60, "every poison event in the DLQ",
             [consumer])
    out = outcome(stack.pg_url, good, "listing poison", stack.kafka, stack.dlq_topic, poison, stuck=stuck)
    print(out.line())
    assert out.clean(dlq_exactly_once=True), out.report(dlq_exactly_once=True)

    sent = dict(records)
    for key, [record] in _dlq(stack.kafka, stack.dlq_topic).items():
        headers = _headers(record)
        assert record.value == (sent[key] or b""), f"{key}: the DLQ keeps the original bytes"
        assert (headers["source_topic"], headers["source_partition"]) == (stack.topic, "0")
        if headers["dlq_reason"] == "db_refused":
            assert _db_message(key) in headers["dlq_detail"], headers
    with psycopg.connect(stack.pg_url) as conn:
        stored = {r[0] for r in conn.execute("SELECT listing_id FROM listings").fetchall()}
    assert not stored & set(poison), "a poison event reached the listings table"
    assert worker.alive and consumer.alive, process_report([worker, consumer])


def test_correction_poison_of_every_kind_on_one_partition(make_stack, fault_model_dir):
    stack = make_stack(max_event_bytes=MAX_BYTES)
    install_refusals(stack.pg_url)
    listings = [f"cl-{i:04d}" for i in range(120)]
    with psycopg.connect(stack.pg_url, autocommit=True) as conn:
        # the listings exist (a correction to an unknown one is refused); the active model's taxonomy is what
        # groups and values are checked against
        with conn.transaction():
            upsert_listings(conn, [ListingEvent(listing_id=lid, seller_id="s", images=stack.images[:1])
                                   for lid in listings])
        promote(conn, register_candidate(conn, fault_model_dir).model_version)

    colours = ["black", "white", "red", "green", "blue", "yellow", "purple", "orange"]
    corrections, good, poison = [], {}, {}
    for i, lid in enumerate(listings):
        key = f"corr-{i:04d}"
        corrections.append((key, encode(correction_event(key, lid, "colour", colours[i % len(colours)]))))
        good[key] = (lid, colours[i % len(colours)])
        if i % 8 == 7:
            kind = list(CORRECTION_POISON)[(i // 8) % len(CORRECTION_POISON)]
            pkey = f"corr-poison-{kind}-{i:04d}"
            corrections.append((pkey, poison_correction(kind, pkey, lid, MAX_BYTES)))
            poison[pkey] = CORRECTION_POISON[kind]
    assert set(poison.values()) == set(CORRECTION_POISON.values())
    produce(stack.kafka, stack.corrections_topic, corrections, partition=0)
    corr = stack.corrections()

    def stored() -> dict:
        with psycopg.connect(stack.pg_url) as conn:
            return {r[0]: (r[1], r[2]) for r in conn.execute(
                "SELECT event_id, listing_id, new_value FROM corrections").fetchall()}

    wait_for(lambda: len(stored()) >= len(good), 120, "every good correction stored", [corr])
    wait_for(lambda: len(read_topic(stack.kafka, stack.corrections_dlq_topic)) >= len(poison), 60,
             "every poison correction in the DLQ", [corr])
    with psycopg.connect(stack.pg_url) as conn:
        tags = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT listing_id, value, source FROM listing_tags WHERE tag_group = 'colour'").fetchall()}
        writes = conn.execute("SELECT listing_id, count(*) FROM fault_writes WHERE what = 'tag:corrected'"
                              " GROUP BY listing_id").fetchall()
    dlq = _dlq(stack.kafka, stack.corrections_dlq_topic)
    doubled = [lid for lid, n in writes if n > 1]
    print(f"[correction poison] produced={len(good)} poison={len(poison)} stored={len(stored())} "
          f"dlq={sum(map(len, dlq.values()))} doubled={len(doubled)}")
    assert stored() == good, "exactly the good corrections are stored"
    assert all(tags.get(lid) == (value, "corrected") for lid, value in good.values()), "corrections are the tags now"
    assert not doubled, f"corrected tags written more than once: {doubled[:8]}"
    assert {k: [_headers(r)["dlq_reason"] for r in recs] for k, recs in dlq.items()} == \
        {k: [reason] for k, reason in poison.items()}, "each poison correction once in the DLQ, with its reason"
    for key, [record] in dlq.items():
        headers = _headers(record)
        if headers["dlq_reason"] == "db_refused":
            assert _db_message(key) in headers["dlq_detail"], headers
    assert corr.alive, process_report([corr])
