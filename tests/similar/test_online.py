"""Online neighbours for freshly embedded listings: snapshot + exact delta, deleted filtered, shelf view."""
from __future__ import annotations

import threading

import numpy as np
import psycopg
from similar_helpers import add_listings, clustered, unit

from core.rows import fetch_value
from similar import nightly, online, query
from similar.common import Neighbour

IDS = [f"old-{i:03d}" for i in range(200)]


def _near(v: np.ndarray, seed: int) -> np.ndarray:
    return unit(v + 0.01 * np.random.default_rng(seed).normal(size=v.shape))


def _shelf(db, lid):
    return db.execute("SELECT source, neighbour_ids, scores FROM similar_items_current"
                      " WHERE model_version = 'm1' AND listing_id = %s", (lid,)).fetchone()


def _catalogue_after_nightly(db, root, settings, seed: int) -> np.ndarray:
    """IDS with clustered vectors, one nightly run (k=5) done, the online path's snapshot cache empty."""
    vecs = clustered(len(IDS), seed=seed)
    add_listings(db, IDS, vecs)
    nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    online._SNAPSHOT_CACHE.clear()
    return vecs


def test_new_listing_gets_its_near_duplicate_from_the_snapshot_and_the_delta(db, root, settings):
    vecs = clustered(len(IDS), seed=20, clusters=4)
    add_listings(db, IDS, vecs)
    nightly.recompute(db, "m1", k=5, root=root, factory="IVF4,Flat", nprobe=2, settings=settings)
    online._SNAPSHOT_CACHE.clear()

    # two new listings after the nightly run: a re-upload of old-007 and a near copy of the first
    add_listings(db, ["new-a"], [_near(vecs[7], 1)])
    add_listings(db, ["new-b"], [_near(vecs[7], 2)])
    assert online.write_online_neighbours(db, ["new-a", "new-b", "missing"], "m1", k=5, root=root,
                                          settings=settings) == 2

    source, neigh, scores = _shelf(db, "new-a")
    assert source == "online"
    assert set(neigh[:2]) == {"old-007", "new-b"}  # from the snapshot and from the delta
    assert scores == sorted(scores, reverse=True) and len(neigh) == 5 and "new-a" not in neigh
    # nightly rows are still what shelves show for listings the online path did not touch
    assert _shelf(db, "old-001")[0] == "nightly"


def test_deleted_or_sold_listings_are_filtered_out(db, root, settings):
    vecs = _catalogue_after_nightly(db, root, settings, seed=21)
    db.execute("UPDATE listings SET status = 'deleted' WHERE listing_id = 'old-003'")  # sold after the snapshot
    add_listings(db, ["new"], [_near(vecs[3], 3)])
    online.write_online_neighbours(db, ["new"], "m1", k=5, root=root, settings=settings)
    _, neigh, _ = _shelf(db, "new")
    assert "old-003" not in neigh and len(neigh) == 5
    # shelves drop neighbours deleted after they were computed, at read time
    db.execute("UPDATE listings SET status = 'deleted' WHERE listing_id = %s", (neigh[0],))
    shown, source = query.read_neighbours(db, "new", "m1")
    assert source == "online" and [n.listing_id for n in shown] == neigh[1:]


def test_without_a_snapshot_the_whole_catalogue_is_searched_exactly(db, root, settings):
    vecs = clustered(50, seed=22)
    ids = [f"a{i}" for i in range(50)]
    add_listings(db, ids, vecs)
    online._SNAPSHOT_CACHE.clear()
    online.write_online_neighbours(db, ["a0"], "m1", k=3, root=root, settings=settings)
    sims = vecs[1:] @ vecs[0]
    expected = [ids[1 + i] for i in np.argsort(-sims)[:3]]
    assert _shelf(db, "a0")[1] == expected


def test_the_next_nightly_version_supersedes_older_online_rows(db, root, settings):
    vecs = _catalogue_after_nightly(db, root, settings, seed=23)
    add_listings(db, ["new"], [_near(vecs[9], 4)])
    online.write_online_neighbours(db, ["new"], "m1", k=5, root=root, settings=settings)
    assert _shelf(db, "new")[0] == "online"
    nightly.recompute(db, "m1", k=5, root=root, settings=settings)
    assert _shelf(db, "new")[0] == "nightly"
    assert db.execute("SELECT count(*) FROM similar_items_online").fetchone()[0] == 0
    # the online path picked up the new snapshot (LATEST moved) rather than the cached old one
    add_listings(db, ["newer"], [_near(vecs[9], 5)])
    online.write_online_neighbours(db, ["newer"], "m1", k=5, root=root, settings=settings)
    assert online._SNAPSHOT_CACHE["m1"].manifest.count == len(IDS) + 1
    assert "new" in _shelf(db, "newer")[1][:2]


def test_a_big_catalogue_without_snapshot_is_not_held_in_every_worker(db, root, settings):
    settings = settings.model_copy(update={"online_delta_max": 20})
    add_listings(db, [f"b{i}" for i in range(30)], clustered(30, seed=24))
    online._SNAPSHOT_CACHE.clear()
    assert online.write_online_neighbours(db, ["b0"], "m1", k=3, root=root, settings=settings) == 0
    nightly.recompute(db, "m1", k=3, root=root, settings=settings)
    assert online.write_online_neighbours(db, ["b0"], "m1", k=3, root=root, settings=settings) == 1


def test_a_new_listing_joins_the_shelves_of_its_neighbours_once(db, root, settings):
    vecs = _catalogue_after_nightly(db, root, settings, seed=25)
    nightly = _shelf(db, "old-007")
    assert nightly[0] == "nightly"
    far = next(i for i in IDS if float(vecs[int(i[-3:])] @ vecs[7]) < 0)  # nowhere near the new listing

    add_listings(db, ["new"], [_near(vecs[7], 6)])  # a near copy of old-007, after the nightly run
    online.write_online_neighbours(db, ["new"], "m1", k=5, root=root, settings=settings)
    source, neigh, scores = _shelf(db, "old-007")
    assert source == "online" and neigh == ["new", *nightly[1][:4]]  # ranked in first, the last one out
    assert scores == sorted(scores, reverse=True)
    assert _shelf(db, far)[0] == "nightly"  # shelves it does not rank in are left alone
    joined = db.execute("SELECT listing_id, computed_at FROM similar_items_online WHERE listing_id <> 'new'"
                        " ORDER BY listing_id").fetchall()
    assert ("old-007" in {r[0] for r in joined}) and all("new" in _shelf(db, r[0])[1] for r in joined)

    # a replay (retried task, re-enqueued listing) writes nothing into those shelves again
    online.write_online_neighbours(db, ["new"], "m1", k=5, root=root, settings=settings)
    assert db.execute("SELECT listing_id, computed_at FROM similar_items_online WHERE listing_id <> 'new'"
                      " ORDER BY listing_id").fetchall() == joined
    assert _shelf(db, "old-007")[1].count("new") == 1


def test_two_workers_merging_into_one_shelf_take_turns(db, pg_url, root, settings):
    """While one writer holds a shelf's lock, another waits for it instead of merging into a copy that
    is about to change; the shelf ends with both new listings. (Real writers take all their locks in
    one ordered statement; taking more after waiting, as a test could, would deadlock.)"""
    vecs = _catalogue_after_nightly(db, root, settings, seed=26)
    add_listings(db, ["new-a", "new-b"], [_near(vecs[7], 7), _near(vecs[7], 8)])
    with psycopg.connect(pg_url, autocommit=True) as first, psycopg.connect(pg_url, autocommit=True) as second:
        pid = second.info.backend_pid
        with first.transaction(), first.cursor() as cur:
            online._lock_shelves(cur, "m1", ["old-007"])  # as a writer mid-merge holds it
            done = threading.Thread(target=online.write_online_neighbours, args=(second, ["new-b"], "m1"),
                                    kwargs={"k": 5, "root": root, "settings": settings})
            done.start()
            for _ in range(600):  # until the second writer waits on the advisory lock
                waiting = fetch_value(db, "SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,))
                if waiting == "advisory":
                    break
                done.join(0.05)
            assert waiting == "advisory" and done.is_alive()
        done.join(30)  # the first writer committed: the second goes on
        assert not done.is_alive()
        online.write_online_neighbours(first, ["new-a"], "m1", k=5, root=root, settings=settings)
    assert {"new-a", "new-b"} <= set(_shelf(db, "old-007")[1][:2])


def test_merge_shelf_ranks_incoming_listings_in_and_reports_no_change():
    shelf, scores = ["a", "b", "c"], [0.9, 0.8, 0.7]
    top = online.merge_shelf(shelf, scores, [Neighbour("x", 0.85)], k=3)
    assert top == [("a", 0.9), ("x", 0.85), ("b", 0.8)]
    assert online.merge_shelf(shelf, scores, [Neighbour("y", 0.1)], k=3) is None  # does not rank
    assert online.merge_shelf(shelf, scores, [Neighbour("b", 0.8)], k=3) is None  # already there
    assert [c for c, _ in online.merge_shelf(["a"], [0.9], [Neighbour("z", 0.2)], k=3)] == ["a", "z"]


def test_the_nightly_switch_does_not_wait_for_a_shelf_a_worker_is_writing(db, pg_url, root, settings):
    """The switch's cleanup skips online rows locked by an open writer instead of waiting (which could
    deadlock the two); the view shows the new nightly row all the same."""
    vecs = _catalogue_after_nightly(db, root, settings, seed=27)
    add_listings(db, ["new"], [_near(vecs[7], 9)])
    online.write_online_neighbours(db, ["new"], "m1", k=5, root=root, settings=settings)
    assert _shelf(db, "old-007")[0] == "online"
    with psycopg.connect(pg_url) as writer:
        writer.execute("SET lock_timeout = '60s'")
        writer.execute("SELECT 1 FROM similar_items_online WHERE listing_id = 'old-007' FOR UPDATE")
        db.execute("SET lock_timeout = '5s'")  # waiting on the writer would fail the recompute here
        try:
            nightly.recompute(db, "m1", k=5, root=root, settings=settings)
        finally:
            db.execute("RESET lock_timeout")
        writer.rollback()
    assert _shelf(db, "old-007")[0] == "nightly" and _shelf(db, "new")[0] == "nightly"
    left = [r[0] for r in db.execute("SELECT listing_id FROM similar_items_online")]
    assert left == ["old-007"]  # skipped, not deleted: superseded all the same, gone after the next run
