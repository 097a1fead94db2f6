"""Migrations on the real Postgres: apply to an empty database twice, constraints hold, lock works."""
from __future__ import annotations

import threading

import psycopg
import pytest

from migrations import apply_all, pending
from migrations.runner import discover

EXPECTED_TABLES = {
    "listings", "listing_tags", "embeddings", "similar_items", "similar_items_versions",
    "similar_items_active", "review_queue", "corrections", "models", "processed_events",
}


def _tables(conn) -> set[str]:
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {r[0] for r in rows}


def test_apply_twice_on_empty_database(empty_db_url):
    with psycopg.connect(empty_db_url) as conn:
        first = apply_all(conn)
        assert first == [m.name for m in discover()]
        assert EXPECTED_TABLES <= _tables(conn)
        assert apply_all(conn) == []
        assert pending(conn) == []


def test_concurrent_migrators_apply_each_file_once(empty_db_url):
    results: list[list[str]] = []

    def run() -> None:
        with psycopg.connect(empty_db_url) as conn:
            results.append(apply_all(conn))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    applied = [name for r in results for name in r]
    assert sorted(applied) == sorted(m.name for m in discover())


def test_edited_migration_is_refused(empty_db_url, tmp_path):
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE IF NOT EXISTS t (x int);")
    with psycopg.connect(empty_db_url) as conn:
        assert apply_all(conn, tmp_path) == ["0001_a"]
        (tmp_path / "0001_a.sql").write_text("CREATE TABLE IF NOT EXISTS t (x bigint);")
        with pytest.raises(RuntimeError, match="edited after it was applied"):
            apply_all(conn, tmp_path)


def test_badly_named_file_is_refused(tmp_path):
    (tmp_path / "1_init.sql").write_text("SELECT 1")
    with pytest.raises(ValueError, match="NNNN_snake_case"):
        discover(tmp_path)


def test_one_current_tag_per_group_and_predicted_needs_provenance(db):
    tag = "INSERT INTO listing_tags (listing_id, tag_group, value, source) VALUES ('L1', %s, %s, %s)"
    db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash) VALUES ('L1','S1','{}','h')")
    db.execute(tag, ("category", "Dress", "seller"))
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(tag, ("category", "Tee", "seller"))
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(tag, ("sleeve", "x", "predicted"))
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(tag, ("fit", "x", "guessed"))


def test_embedding_length_must_match_dim(db):
    db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash) VALUES ('L1','S1','{}','h')")
    db.execute("INSERT INTO embeddings (listing_id, model_version, dim, vector) VALUES ('L1','m',2,%s)", (b"\0" * 8,))
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("INSERT INTO embeddings (listing_id, model_version, dim, vector) VALUES ('L1','m2',2,%s)",
                   (b"\0" * 4,))


def test_only_one_active_model(db):
    db.execute("INSERT INTO models (model_version, manifest, path, status) VALUES ('a','{}','/a','active')")
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute("INSERT INTO models (model_version, manifest, path, status) VALUES ('b','{}','/b','active')")
