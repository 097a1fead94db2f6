"""Which model's shelves readers see across a promotion, a backfill and a rollback, which model the nightly
run rebuilds, and which models' rows are pruned (synthetic embeddings, real Postgres)."""
from __future__ import annotations

import json
import threading

import psycopg
from similar_helpers import add_embeddings, add_listings, clustered

from similar import nightly
from similar.common import reindex_model_version, resolve_model_version, shelf_model_version
from similar.query import read_neighbours
from similar.snapshots import latest_snapshot_dir

IDS = [f"sh-{i:02d}" for i in range(30)]


def _model(db, version: str, status: str, was_active: bool | None = None) -> None:
    """A registry row as promote/rollback leave it (activation sets promoted_at = now())."""
    was_active = status in ("active", "retired") if was_active is None else was_active
    if status == "active":
        db.execute("UPDATE models SET status = 'retired' WHERE status = 'active'")
    db.execute(
        "INSERT INTO models (model_version, manifest, path, status, was_active, promoted_at)"
        " VALUES (%s, %s::jsonb, '/nowhere', %s, %s, CASE WHEN %s THEN clock_timestamp() END)"
        " ON CONFLICT (model_version) DO UPDATE SET status = EXCLUDED.status,"
        " was_active = models.was_active OR EXCLUDED.was_active,"
        " promoted_at = coalesce(EXCLUDED.promoted_at, models.promoted_at)",
        (version, json.dumps({}), status, was_active, status == "active"),
    )


def _backfill(db, version: str, status: str) -> None:
    db.execute("INSERT INTO backfills (model_version, status) VALUES (%s, %s)"
               " ON CONFLICT (model_version) DO UPDATE SET status = EXCLUDED.status", (version, status))


def _shelf(db, lid: str) -> list[str]:
    return [n.listing_id for n in read_neighbours(db, lid)[0]]


def _stored(db, version: str, lid: str) -> list[str]:
    return db.execute("SELECT s.neighbour_ids FROM similar_items s JOIN similar_items_active a USING (version)"
                      " WHERE a.model_version = %s AND s.listing_id = %s", (version, lid)).fetchone()[0]


def test_readers_keep_the_old_models_shelves_until_the_new_one_has_its_own(db, root, settings):
    add_listings(db, IDS, clustered(len(IDS), seed=40), model_version="m1")
    _model(db, "m1", "active")
    assert reindex_model_version(db) == "m1"  # the first model: nothing else could serve
    nightly.recompute(db, settings=settings, k=4, root=root)
    assert shelf_model_version(db) == resolve_model_version(db) == "m1"
    old = _stored(db, "m1", "sh-00")
    assert _shelf(db, "sh-00") == old

    _model(db, "m2", "active")  # promoted; the backfill has not started
    add_embeddings(db, IDS[:10], clustered(10, seed=41), "m2")  # then re-embedded a third of the catalogue
    assert shelf_model_version(db) == resolve_model_version(db) == "m1" and _shelf(db, "sh-00") == old
    assert reindex_model_version(db) == "m1"  # no half catalogue replaces whole shelves
    _backfill(db, "m2", "running")
    assert reindex_model_version(db) == "m1"
    add_embeddings(db, IDS[10:], clustered(20, seed=42), "m2")
    _backfill(db, "m2", "done")
    assert reindex_model_version(db) == "m2" and shelf_model_version(db) == "m1"  # until the reindex switches
    assert nightly.recompute(db, settings=settings, k=4, root=root).model_version == "m2"
    assert shelf_model_version(db) == "m2" and _shelf(db, "sh-00") == _stored(db, "m2", "sh-00")

    _model(db, "m1", "active")  # a rollback: m1's shelves were kept
    assert shelf_model_version(db) == "m1" and _shelf(db, "sh-00") == old
    assert reindex_model_version(db) == "m1"
    _model(db, "m3", "active")  # promoted, no shelves: the most recently active model with shelves serves
    assert shelf_model_version(db) == "m1"
    _model(db, "m2", "active")
    assert shelf_model_version(db) == "m2"


def test_a_model_rolled_back_from_never_serves_shelves_again_until_promoted_again(db, root, settings):
    add_listings(db, IDS, clustered(len(IDS), seed=50), model_version="bad")
    _model(db, "good", "retired")  # active before; its shelves were pruned
    _model(db, "bad", "active")
    nightly.recompute(db, settings=settings, k=4, root=root)
    assert shelf_model_version(db) == "bad"
    _model(db, "good", "active")  # the rollback, recorded as `model.registry.rollback` records it
    db.execute("INSERT INTO model_events (model_version, action, previous, actor) VALUES ('good', 'rollback',"
               " 'bad', 'test')")
    assert shelf_model_version(db) is None  # no shelves until the restored model's reindex; never the bad ones
    assert resolve_model_version(db) == reindex_model_version(db) == "good"
    _model(db, "bad", "active")  # promoted again on purpose: it serves again
    assert shelf_model_version(db) == "bad"


def test_without_a_registry_readers_use_the_most_embedded_version(db, root, settings):
    add_listings(db, IDS, clustered(len(IDS), seed=43), model_version="x1")
    add_embeddings(db, IDS[:5], clustered(5, seed=44), "x2")
    nightly.recompute(db, "x1", settings=settings, k=4, root=root)
    assert resolve_model_version(db) == reindex_model_version(db) == "x1"
    assert _shelf(db, "sh-03") == _stored(db, "x1", "sh-03")


def test_pruning_keeps_the_last_active_models_the_serving_one_and_never_candidates(db, root, settings):
    add_listings(db, IDS, clustered(len(IDS), seed=45), model_version="m1")
    for version, seed in (("m2", 46), ("m3", 47), ("cand", 48), ("adhoc", 49)):
        add_embeddings(db, IDS, clustered(len(IDS), seed=seed), version)
    _model(db, "m1", "active")
    nightly.recompute(db, settings=settings, k=4, root=root)
    _model(db, "m2", "active")
    _model(db, "m3", "active")  # neither m2 nor m3 reindexed yet: m1 still serves
    _model(db, "cand", "candidate")  # "adhoc" is not registered at all (ENRICH_MODEL_DIR)
    nightly.recompute(db, "cand", settings=settings, k=4, root=root)
    assert nightly.prune_models(db, settings=settings, keep=1) == ["m2"]  # m1 serves, m3 is active
    assert latest_snapshot_dir(root, "m1") is not None
    nightly.recompute(db, "m3", settings=settings, k=4, root=root)
    assert nightly.prune_models(db, settings=settings, keep=1) == ["m1"]
    versions = {r[0] for r in db.execute("SELECT DISTINCT model_version FROM embeddings")}
    assert versions == {"m3", "cand", "adhoc"}
    assert {r[0] for r in db.execute("SELECT model_version FROM similar_items_active")} == {"m3", "cand"}
    assert latest_snapshot_dir(root, "m1") is None and not (root / "m1").exists()


def test_a_reader_never_sees_an_empty_shelf_while_the_new_model_switches_in_and_the_old_is_pruned(
        db, pg_url, root, settings):
    add_listings(db, IDS, clustered(len(IDS), seed=50), model_version="m1")
    _model(db, "m1", "active")
    nightly.recompute(db, settings=settings, k=4, root=root)
    _model(db, "m2", "active")
    add_embeddings(db, IDS, clustered(len(IDS), seed=51), "m2")
    _backfill(db, "m2", "done")
    stop, lengths = threading.Event(), []

    def poll() -> None:
        with psycopg.connect(pg_url, autocommit=True) as reader:
            while not stop.is_set():
                lengths.append(len(read_neighbours(reader, "sh-07")[0]))

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        nightly.recompute(db, settings=settings, k=4, root=root)
        assert nightly.prune_models(db, settings=settings, keep=1) == ["m1"]
        n = len(lengths)
        while len(lengths) < n + 5:  # a few reads after the prune too
            stop.wait(0.01)
    finally:
        stop.set()
        thread.join()
    assert lengths and set(lengths) == {4}
