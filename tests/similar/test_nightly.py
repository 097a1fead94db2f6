"""Nightly recompute on real Postgres: correctness, atomic switch, crash safety, model isolation, shards."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from similar_helpers import add_embeddings, add_listings, clustered, exact_neighbours, unit

from similar import index as ix
from similar import nightly
from similar import store as sdb
from similar.snapshots import latest_snapshot_dir, load_snapshot

IDS = [f"item-{i:03d}" for i in range(120)]


def _stored(db, model_version="m1") -> dict[str, list[str]]:
    rows = db.execute("SELECT listing_id, neighbour_ids FROM similar_items_current WHERE model_version = %s",
                      (model_version,)).fetchall()
    return dict(rows)


def test_flat_recompute_equals_exact_search_and_excludes_self(db, root, settings):
    vecs = clustered(len(IDS), seed=1)
    add_listings(db, IDS, vecs)
    result = nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    assert result.factory == "Flat" and result.count == len(IDS)
    assert sdb.active_version(db, "m1") == result.version
    assert _stored(db) == exact_neighbours(vecs, IDS, 5)
    scores = db.execute("SELECT scores FROM similar_items WHERE listing_id = 'item-000'").fetchone()[0]
    assert scores == sorted(scores, reverse=True)


def test_ivf_probing_every_list_equals_exact(db, root, settings):
    vecs = clustered(600, seed=2)
    ids = [f"x{i:04d}" for i in range(600)]
    add_listings(db, ids, vecs)
    result = nightly.recompute(db, "m1", k=10, factory="IVF8,Flat", nprobe=8, root=root, settings=settings)
    assert result.factory == "IVF8,Flat"
    assert _stored(db) == exact_neighbours(vecs, ids, 10)


def test_a_big_catalogue_streamed_into_its_lists_and_searched_list_by_list_equals_exact(db, root, settings):
    vecs = clustered(600, seed=5)
    ids = [f"x{i:04d}" for i in range(600)]
    add_listings(db, ids, vecs)
    result = nightly.recompute(db, "m1", k=10, factory="IVF8,Flat", nprobe=8, grouped=True, root=root,
                               settings=settings)
    assert result.factory == "IVF8,Flat"
    params = db.execute("SELECT params FROM similar_items_versions WHERE version = %s", (result.version,)).fetchone()[0]
    assert params["spec"]["grouped"]
    assert _stored(db) == exact_neighbours(vecs, ids, 10)  # every list probed: exact
    # the snapshot serves the online path like any other index: its ids are in sorted order
    snap = load_snapshot(Path(result.snapshot), "m1", mmap=True)
    _, pos = snap.index.search(vecs[:5].astype(np.float32), 1)
    assert [snap.ids[p[0]].decode() for p in pos] == ids[:5]
    # nothing but the index holds the vectors
    with nightly._read_build_snapshot(db, settings, "m1", k=10, factory="IVF8,Flat", nprobe=8, root=root,
                                      grouped=True) as built:
        assert built.emb.vectors.size == 0


def test_deleted_listings_are_not_indexed(db, root, settings):
    vecs = clustered(len(IDS), seed=3)
    add_listings(db, IDS, vecs)
    db.execute("UPDATE listings SET status = 'deleted' WHERE listing_id IN ('item-001', 'item-002')")
    nightly.recompute(db, "m1", k=8, root=root, settings=settings)
    stored = _stored(db)
    assert "item-001" not in stored
    assert not any({"item-001", "item-002"} & set(n) for n in stored.values())


def test_model_versions_never_mix(db, root, settings):
    vecs = clustered(len(IDS), seed=4)
    add_listings(db, IDS, vecs, "m1")
    # model m2 embedded only half the catalogue, in another space (and dimension)
    add_embeddings(db, IDS[:60], clustered(60, dim=16, seed=5), "m2")
    r2 = nightly.recompute(db, "m2", k=5, root=root, settings=settings)
    r1 = nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    assert r1.version != r2.version
    assert sdb.active_version(db, "m2") == r2.version  # m1's run did not touch m2's active version
    stored2 = _stored(db, "m2")
    assert set(stored2) == set(IDS[:60])
    assert all(set(n) <= set(IDS[:60]) for n in stored2.values())
    assert _stored(db, "m1") == exact_neighbours(vecs, IDS, 5)
    with pytest.raises(ValueError, match="is for model"):
        load_snapshot(latest_snapshot_dir(root, "m1"), "m2")


def test_readers_see_the_old_version_whole_until_the_switch(db, pg_url, root, monkeypatch, settings):
    old_vecs = clustered(len(IDS), seed=6)
    add_listings(db, IDS, old_vecs)
    first = nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    old = _stored(db)
    # the model re-embedded everything differently; the next night recomputes
    db.execute("DELETE FROM embeddings")
    new_vecs = clustered(len(IDS), seed=7)
    add_embeddings(db, IDS, new_vecs)
    new = exact_neighbours(new_vecs, IDS, 5)
    assert new != old

    monkeypatch.setattr(ix, "SEARCH_BATCH", 25)  # several chunks, so we can look mid-write
    seen = []
    with psycopg.connect(pg_url, autocommit=True) as reader:
        def look(written: int) -> None:
            seen.append(written)
            assert _stored(reader) == old  # whole old version while the new one is being written
            building = reader.execute("SELECT count(*) FROM similar_items_versions WHERE status = 'building'")
            assert building.fetchone()[0] == 1

        second = nightly.recompute(db, "m1", k=5, root=root, after_chunk=look, settings=settings)
        assert len(seen) >= 4
        assert _stored(reader) == new  # and the new one whole after
    assert second.replaced == first.version
    statuses = dict(db.execute("SELECT version, status FROM similar_items_versions").fetchall())
    assert statuses == {first.version: "retired", second.version: "ready"}
    third = nightly.recompute(db, "m1", k=5, root=root, keep_versions=1, settings=settings)
    assert third.pruned == [first.version]  # only one retired version is kept for rollback
    assert db.execute("SELECT count(*) FROM similar_items WHERE version = %s", (first.version,)).fetchone()[0] == 0


def test_a_reader_polling_through_the_switch_always_sees_one_whole_version(db, pg_url, root, monkeypatch,
                                                                           settings):
    add_listings(db, IDS, clustered(len(IDS), seed=12))
    nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    monkeypatch.setattr(ix, "SEARCH_BATCH", 10)
    stop, answers, errors = threading.Event(), [], []

    def poll() -> None:
        with psycopg.connect(pg_url, autocommit=True) as reader:
            while not stop.is_set():
                rows = reader.execute(
                    "SELECT a.version, count(*), count(DISTINCT s.listing_id) FROM similar_items_active a"
                    " JOIN similar_items s ON s.version = a.version WHERE a.model_version = 'm1' GROUP BY a.version"
                ).fetchall()
                answers.append(rows)
                if len(rows) != 1 or rows[0][1] != len(IDS) or rows[0][2] != len(IDS):
                    errors.append(rows)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        for _ in range(3):
            nightly.recompute(db, "m1", k=5, root=root, after_chunk=lambda n: time.sleep(0.005),
                              settings=settings)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert len({rows[0][0] for rows in answers}) >= 2  # it did see the switch happen


def test_crash_mid_recompute_keeps_the_old_version_active(db, pg_url, root, settings):
    vecs = clustered(len(IDS), seed=8)
    add_listings(db, IDS, vecs)
    first = nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    old = _stored(db)
    db.execute("UPDATE embeddings SET vector = %s WHERE listing_id = 'item-000'",
               (unit(np.ones(32)).astype("<f4").tobytes(),))

    # a real crash: the process kills itself (SIGKILL) after writing its first chunk
    script = textwrap.dedent(f"""
        import os, signal, psycopg
        from core.config import Settings
        from similar import index as ix, nightly
        ix.SEARCH_BATCH = 20
        conn = psycopg.connect({pg_url!r}, autocommit=True)
        nightly.recompute(conn, "m1", k=5, root={str(root)!r}, settings=Settings(),
                          after_chunk=lambda n: os.kill(os.getpid(), signal.SIGKILL))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert sdb.active_version(db, "m1") == first.version
    assert _stored(db) == old
    leftover = db.execute("SELECT version FROM similar_items_versions WHERE status = 'building'").fetchall()
    assert len(leftover) == 1

    # an error (not a kill) is cleaned up at once
    with pytest.raises(RuntimeError, match="disk full"):
        nightly.recompute(db, "m1", k=5, root=root, settings=settings,
                          after_chunk=lambda n: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert _stored(db) == old

    # the next run cleans up the leftovers and switches
    third = nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    statuses = dict(db.execute("SELECT version, status FROM similar_items_versions").fetchall())
    assert statuses[leftover[0][0]] == "failed" and statuses[third.version] == "ready"
    assert db.execute("SELECT count(*) FROM similar_items WHERE version = %s", (leftover[0][0],)).fetchone()[0] == 0
    assert _stored(db)["item-000"] != old["item-000"]


def test_a_late_failure_never_empties_the_version_that_serves(db, root, settings):
    vecs = clustered(len(IDS), seed=12)
    add_listings(db, IDS, vecs)
    served = nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    before = _stored(db)
    sdb.mark_failed(db, [served.version], "error while pruning")  # what a failure after the switch calls
    assert sdb.active_version(db, "m1") == served.version
    assert _stored(db) == before


def test_one_run_per_model_version_at_a_time(db, pg_url, root, settings):
    add_listings(db, IDS, clustered(len(IDS), seed=9))
    with psycopg.connect(pg_url, autocommit=True) as other:
        key = nightly._lock_key(other, "m1")
        other.execute("SELECT pg_advisory_lock(%s)", (key,))
        with pytest.raises(nightly.ReindexBusy):
            nightly.recompute(db, "m1", k=5, root=root, settings=settings)


def test_sharded_runs_take_the_same_lock(db, pg_url, root, settings):
    add_listings(db, IDS, clustered(len(IDS), seed=9))
    first = nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    with psycopg.connect(pg_url, autocommit=True) as other:
        key = nightly._lock_key(other, "m1")
        other.execute("SELECT pg_advisory_lock(%s)", (key,))
        with pytest.raises(nightly.ReindexBusy):
            nightly.prepare_shards(db, "m1", 2, k=5, root=root, settings=settings)
        other.execute("SELECT pg_advisory_unlock(%s)", (key,))
    # nothing was opened or abandoned while the other run held the lock
    statuses = dict(db.execute("SELECT version, status FROM similar_items_versions").fetchall())
    assert statuses == {first.version: "ready"}
    # and the lock is released after preparing, so the shards' run (or the next night) is not blocked
    nightly.prepare_shards(db, "m1", 2, k=5, root=root, settings=settings)
    with psycopg.connect(pg_url, autocommit=True) as other:
        assert other.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]


def test_sharded_recompute_matches_single_process(db, root, settings):
    vecs = clustered(len(IDS), seed=10)
    add_listings(db, IDS, vecs)
    version, bounds = nightly.prepare_shards(db, "m1", 3, k=5, root=root, settings=settings)
    assert len(bounds) == 3 and bounds[0][0] is None and bounds[-1][1] is None
    # a listing embedded after the snapshot still gets neighbours from its shard
    add_listings(db, ["item-999"], vecs[:1] * 0.999 + 0.001)
    written = [nightly.compute_shard(db, version, lo, hi, settings=settings) for lo, hi in bounds]
    # re-running a shard is idempotent
    assert nightly.compute_shard(db, version, *bounds[1], settings=settings) == written[1]
    result = nightly.finish_shards(db, version, root=root, settings=settings)
    assert result.count == len(IDS) + 1
    stored = _stored(db)
    expected = exact_neighbours(vecs, IDS, 5)
    assert {k: v for k, v in stored.items() if k != "item-999"} == expected
    assert stored["item-999"][0] == "item-000"


def test_a_grouped_index_is_sharded_by_lists_and_matches_one_process(db, root, settings):
    vecs = clustered(600, seed=12)
    ids = [f"x{i:04d}" for i in range(600)]
    add_listings(db, ids, vecs)
    one = nightly.recompute(db, "m1", k=6, factory="IVF12,Flat", nprobe=3, grouped=True, root=root,
                            settings=settings)
    single = _stored(db)
    version, bounds = nightly.prepare_shards(db, "m1", 4, k=6, factory="IVF12,Flat", nprobe=3, grouped=True,
                                             root=root, settings=settings)
    assert bounds == [(0, 3), (3, 6), (6, 9), (9, 12)]  # list ranges, not listing-id ranges
    written = [nightly.compute_shard(db, version, lo, hi, settings=settings) for lo, hi in bounds]
    assert nightly.compute_shard(db, version, *bounds[2], settings=settings) == written[2]  # a rerun replaces
    result = nightly.finish_shards(db, version, root=root, settings=settings)
    assert sum(written) == result.count == len(ids) and result.version != one.version
    assert _stored(db) == single  # the same lists probed the same way (3 of 12: not exact, but identical)


def test_unfinished_shards_never_switch(db, root, settings):
    add_listings(db, IDS, clustered(len(IDS), seed=11))
    first = nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    version, bounds = nightly.prepare_shards(db, "m1", 2, k=5, root=root, settings=settings)
    nightly.compute_shard(db, version, *bounds[0], settings=settings)
    with pytest.raises(RuntimeError, match="only"):
        nightly.finish_shards(db, version, root=root, settings=settings)
    assert sdb.active_version(db, "m1") == first.version


@pytest.mark.parametrize("n", [1, 2, 4])
def test_catalogues_smaller_than_k(db, root, n, settings):
    ids = [f"t{i}" for i in range(n)]
    vecs = clustered(n, seed=13)
    add_listings(db, ids, vecs)
    nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    stored = _stored(db)
    assert stored == exact_neighbours(vecs, ids, n - 1)  # everyone else, never itself


def test_search_runs_at_most_a_bounded_queue_ahead_of_the_writer(db, root, monkeypatch, settings):
    vecs = clustered(len(IDS), seed=14)
    add_listings(db, IDS, vecs)
    monkeypatch.setattr(ix, "SEARCH_BATCH", 5)
    searched, lead = [0], []
    real_search_all = ix.search_all

    def counting_search_all(*args, **kwargs):
        for batch in real_search_all(*args, **kwargs):
            searched[0] += 1
            yield batch

    def slow_writer(written: int) -> None:
        lead.append(searched[0] - written // 5)  # batches searched but not yet written
        time.sleep(0.01)  # a database slower than the search

    monkeypatch.setattr(ix, "search_all", counting_search_all)
    nightly.recompute(db, "m1", k=5, root=root, after_chunk=slow_writer, settings=settings)
    assert len(lead) == len(IDS) // 5
    # one batch being searched, WRITE_QUEUE waiting, one in the writer's hands: results never pile up
    assert 1 <= max(lead) <= nightly.WRITE_QUEUE + 2
    assert _stored(db) == exact_neighbours(vecs, IDS, 5)


def test_a_failing_search_stops_the_writer_and_keeps_the_old_version(db, root, monkeypatch, settings):
    vecs = clustered(len(IDS), seed=15)
    add_listings(db, IDS, vecs)
    first = nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    old = _stored(db)
    monkeypatch.setattr(ix, "SEARCH_BATCH", 10)
    real_search_all = ix.search_all
    written = []

    def failing_search_all(*args, **kwargs):
        for i, batch in enumerate(real_search_all(*args, **kwargs)):
            if i == 4:
                raise MemoryError("faiss ran out of memory")
            yield batch

    monkeypatch.setattr(ix, "search_all", failing_search_all)
    with pytest.raises(MemoryError):
        nightly.recompute(db, "m1", k=5, root=root, after_chunk=written.append, settings=settings)
    assert written  # the writer had copied rows when the search failed; they were rolled back
    assert sdb.active_version(db, "m1") == first.version and _stored(db) == old
    failed = db.execute("SELECT version, status FROM similar_items_versions WHERE version <> %s",
                        (first.version,)).fetchall()
    assert [s for _, s in failed] == ["failed"]
    assert db.execute("SELECT count(*) FROM similar_items WHERE version = %s", (failed[0][0],)).fetchone()[0] == 0
    monkeypatch.setattr(ix, "search_all", real_search_all)
    # the connection was handed back clean: the next run on it switches
    assert nightly.recompute(db, "m1", k=5, root=root, settings=settings).replaced == first.version


def test_losing_the_database_while_the_writer_copies_fails_the_run_and_keeps_the_old_version(db, pg_url, root,
                                                                                          monkeypatch, settings):
    vecs = clustered(len(IDS), seed=16)
    add_listings(db, IDS, vecs)
    first = nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    old = _stored(db)
    monkeypatch.setattr(ix, "SEARCH_BATCH", 10)
    conn = psycopg.connect(pg_url, autocommit=True)

    def kill_session(written: int) -> None:  # what a Postgres restart or a dropped link does
        if written == 20:
            db.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))

    with pytest.raises(psycopg.OperationalError):
        nightly.recompute(conn, "m1", k=5, root=root, after_chunk=kill_session, settings=settings)
    conn.close()
    assert sdb.active_version(db, "m1") == first.version and _stored(db) == old
    # the session's lock went with it; the next run cleans up the version it left building
    leftover = db.execute("SELECT version FROM similar_items_versions WHERE status = 'building'").fetchall()
    assert len(leftover) == 1
    again = nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    statuses = dict(db.execute("SELECT version, status FROM similar_items_versions").fetchall())
    assert statuses[leftover[0][0]] == "failed" and statuses[again.version] == "ready"


def test_a_snapshot_that_cannot_be_saved_fails_the_run_before_the_switch(db, root, monkeypatch, settings):
    vecs = clustered(len(IDS), seed=17)
    add_listings(db, IDS, vecs)
    first = nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    old = _stored(db)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nightly, "save_snapshot", no_space)  # saved in a thread while the search runs
    with pytest.raises(OSError, match="No space"):
        nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    assert sdb.active_version(db, "m1") == first.version and _stored(db) == old
    statuses = [r[0] for r in db.execute("SELECT status FROM similar_items_versions WHERE version <> %s",
                                         (first.version,)).fetchall()]
    assert statuses == ["failed"]
