"""The suite's counters see what they must: outcome() on rows and DLQ records written by hand."""
from __future__ import annotations

import uuid

import psycopg

from harness.cluster import TAG_GROUPS, create_database, drop_database, outcome, produce
from tests.conftest import PG_ADMIN_URL


def _listing(conn, lid: str, status: str) -> None:
    conn.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash, status, enriched_hash)"
                 " VALUES (%s, 's', '{}', 'h', %s, CASE WHEN %s = 'enriched' THEN 'h' END)", (lid, status, status))


def _enrich(conn, lid: str, groups=TAG_GROUPS) -> None:
    conn.execute("INSERT INTO embeddings (listing_id, model_version, dim, vector) VALUES (%s, 'm', 1, '\\x00000000')"
                 " ON CONFLICT (model_version, listing_id) DO UPDATE SET created_at = now()", (lid,))
    for group in groups:
        conn.execute("INSERT INTO listing_tags (listing_id, tag_group, value, source, confidence, model_version)"
                     " VALUES (%s, %s, 'v', 'predicted', 0.5, 'm') ON CONFLICT (listing_id, tag_group)"
                     " DO UPDATE SET value = EXCLUDED.value", (lid, group))


def test_outcome_counts_lost_doubled_pending_and_dlq(kafka_bootstrap):
    url = create_database(PG_ADMIN_URL)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for lid, status in (("ok", "enriched"), ("twice", "enriched"), ("waiting", "pending"),
                                ("failed", "failed"), ("partial", "enriched")):
                _listing(conn, lid, status)
            _enrich(conn, "ok")
            _enrich(conn, "twice")
            _enrich(conn, "twice")  # same rows, written again: only the audit shows it
            _enrich(conn, "partial", groups=TAG_GROUPS[:1])
        dlq = f"fault-harness-{uuid.uuid4().hex[:8]}.dlq"
        produce(kafka_bootstrap, dlq, [("p-right", b"x"), ("p-wrong", b"x"), ("p-twice", b"x"), ("p-twice", b"x"),
                                       ("ok", b"x")])
        # produce() sends no headers: every record here has an empty reason, so p-right expects ""
        out = outcome(url, ["ok", "twice", "waiting", "failed", "partial", "absent"], "harness", kafka_bootstrap, dlq,
                      {"p-right": "", "p-wrong": "not_json", "p-twice": "", "p-missing": "invalid"})
    finally:
        drop_database(url)
    assert out.enriched == 2
    assert sorted(out.lost) == ["absent", "failed", "partial"]
    assert out.pending == ["waiting"]
    assert out.doubled == ["twice"]
    assert out.dlq_missing == ["p-missing"]
    assert out.dlq_wrong == {"p-wrong": ("not_json", "")}
    assert out.dlq_doubled == ["p-twice"]
    assert out.dlq_good == ["ok"]
    assert len(out.problems(dlq_exactly_once=True)) == 9  # 7 counters above + notes on "partial" and "failed"
