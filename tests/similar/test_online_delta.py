"""The online delta (similar/delta.py): a task reads only what was written since the last one, the top-K stays
exact against a brute-force search of everything written, late commits and re-embeddings are not missed, a
new snapshot starts a small delta, and an oversized one asks for a reindex."""
from __future__ import annotations

import json
import uuid

import numpy as np
import psycopg
from prometheus_client import REGISTRY
from similar_helpers import add_listings, clustered, unit

from core.celery_app import REINDEX_TASK, configure
from core.config import Settings
from harness.net import take_queued_tasks
from similar import delta as dl
from similar import nightly, online

K = 5


def _rows_read() -> float:
    return REGISTRY.get_sample_value("enrich_online_rows_read_total") or 0.0


def _brute_force(vectors: dict[str, np.ndarray], qid: str, k: int = K) -> list[str]:
    others = [lid for lid in vectors if lid != qid]
    sims = np.stack([vectors[o] for o in others]) @ vectors[qid]
    return [others[i] for i in np.argsort(-sims, kind="stable")[:k]]


def _top(found, qid) -> list[str]:
    return [n.listing_id for n in found[qid]]


def _catalogue(db, root, settings, n=200, seed=40, factory="Flat", nprobe=None) -> dict[str, np.ndarray]:
    """n listings, one nightly run (an exact flat index unless told): the snapshot the online path starts from."""
    vecs = clustered(n, seed=seed)
    ids = [f"old-{i:03d}" for i in range(n)]
    add_listings(db, ids, vecs)
    nightly.recompute(db, "m1", k=K, root=root, factory=factory, nprobe=nprobe, settings=settings)
    online._SNAPSHOT_CACHE.clear()
    return dict(zip(ids, vecs, strict=True))


def _tasks(db, root, settings, written: dict, prefix: str, tasks: int, size: int, seed: int) -> list[float]:
    """`tasks` online searches of `size` new listings each (added to `written`), each checked against a brute-force
    search of everything written; returns the rows each read from Postgres."""
    fresh = clustered(tasks * size, seed=seed)
    reads = []
    for t in range(tasks):
        ids, vecs = [f"{prefix}-{t}-{i}" for i in range(size)], fresh[size * t:size * (t + 1)]
        add_listings(db, ids, vecs)
        written.update(zip(ids, vecs, strict=True))
        before = _rows_read()
        found = online.online_topk(db, ids, "m1", K, root, settings=settings)
        reads.append(_rows_read() - before)
        assert all(_top(found, q) == _brute_force(written, q) for q in ids)
    return reads


def test_each_task_reads_only_what_was_written_since_the_last_one_and_stays_exact(db, root, settings):
    reads = _tasks(db, root, settings, _catalogue(db, root, settings), "new", tasks=5, size=20, seed=41)
    # re-reading everything since the snapshot would read 20, 40, 60, 80, 100
    assert reads == [20] * 5
    assert dl.held("m1") == 100


def test_a_transaction_that_commits_after_a_read_is_found_by_the_next_one(db, pg_url, root, settings):
    written = _catalogue(db, root, settings, seed=42)
    anchor = written["old-007"]
    with psycopg.connect(pg_url) as slow:  # a worker whose write transaction is still open during the next read
        add_listings(slow, ["late"], [unit(anchor + 0.01)])
        add_listings(db, ["early"], [unit(-anchor)])
        online.online_topk(db, ["early"], "m1", K, root, settings=settings)
        slow.commit()  # its rows are stamped before that read, and committed after it
    add_listings(db, ["probe"], [unit(anchor + 0.02)])
    before = _rows_read()
    found = online.online_topk(db, ["probe"], "m1", K, root, settings=settings)
    assert _top(found, "probe")[0] == "late"
    assert _rows_read() - before == 2  # late and probe, nothing else


def test_a_re_embedded_listing_is_searched_with_its_new_vector_only(db, root, settings):
    written = _catalogue(db, root, settings, seed=43)
    far = unit(-written["old-007"])
    add_listings(db, ["warm-up"], [far])
    online.online_topk(db, ["warm-up"], "m1", K, root, settings=settings)
    # old-007 re-embedded next to old-100 (the worker's upsert gives the row its new transaction id)
    db.execute("UPDATE embeddings SET vector = %s, written_xid = pg_current_xact_id()"
               " WHERE listing_id = 'old-007'", (unit(written["old-100"] + 0.001).astype("<f4").tobytes(),))
    add_listings(db, ["probe"], [unit(written["old-100"] + 0.002)])
    found = online.online_topk(db, ["probe"], "m1", K, root, settings=settings)
    assert "old-007" in _top(found, "probe")[:3]
    assert _top(found, "probe").count("old-007") == 1  # the snapshot's stale vector is not a second hit


def test_a_new_snapshot_starts_a_small_delta(db, root, settings):
    written = _catalogue(db, root, settings, seed=44)
    ids = [f"day-{i}" for i in range(30)]
    add_listings(db, ids, clustered(30, seed=45))
    online.online_topk(db, ids[:1], "m1", K, root, settings=settings)
    assert dl.held("m1") == 30
    nightly.recompute(db, "m1", k=K, root=root, factory="Flat", settings=settings)
    add_listings(db, ["next-day"], [unit(written["old-003"] + 0.01)])
    found = online.online_topk(db, ["next-day"], "m1", K, root, settings=settings)
    assert dl.held("m1") == 1
    assert _top(found, "next-day")[0] == "old-003"


def test_a_delta_past_its_bound_asks_for_one_reindex(db, root, settings):
    queue = f"cpu-delta-{uuid.uuid4().hex[:8]}"
    settings = settings.model_copy(update={"online_delta_max": 10, "cpu_queue": queue,
                                           "celery_broker_url": "redis://127.0.0.1:6379/0"})
    configure(settings)
    try:
        _tasks(db, root, settings, _catalogue(db, root, settings, seed=46), "burst", tasks=3, size=10, seed=47)
        sent = take_queued_tasks(queue)
    finally:
        configure(Settings())
    # once, not once per task over the bound; the reindex picks the model (a backfill's half-embedded one waits)
    assert sent == [{"task": REINDEX_TASK, "args": [], "kwargs": {}}]


def test_the_first_read_after_an_old_snapshot_falls_back_to_its_read_time(db, root, settings):
    """A snapshot built before migration 0008 has no pg_snapshot in its manifest: the delta starts at its read
    time (less the slack), so nothing written after it is missed."""
    written = _catalogue(db, root, settings, seed=48)
    manifest = next(root.rglob("manifest.json"))
    data = json.loads(manifest.read_text())
    data.pop("read_snapshot")
    manifest.write_text(json.dumps(data))
    online._SNAPSHOT_CACHE.clear()
    add_listings(db, ["after"], [unit(written["old-010"] + 0.01)])
    add_listings(db, ["probe"], [unit(written["old-010"] + 0.02)])
    found = online.online_topk(db, ["probe"], "m1", K, root, settings=settings)
    assert _top(found, "probe")[:2] in (["after", "old-010"], ["old-010", "after"])


def test_beside_an_ivf_snapshot_the_delta_is_probed_in_its_lists(db, root, settings):
    """The delta joins the snapshot's IVF lists; probing every list must then give the exact top-K, a
    re-embedded listing counted once with its new vector."""
    written = _catalogue(db, root, settings, n=400, seed=49, factory="IVF8,Flat", nprobe=8)
    _tasks(db, root, settings, written, "ivf", tasks=3, size=20, seed=50)
    assert not dl._DELTAS["m1"].exact and dl.held("m1") == 60
    moved = unit(written["old-100"] + 0.001)
    db.execute("UPDATE embeddings SET vector = %s, written_xid = pg_current_xact_id() WHERE listing_id = 'ivf-0-0'",
               (moved.astype("<f4").tobytes(),))
    written["ivf-0-0"] = moved
    add_listings(db, ["probe"], [unit(written["old-100"] + 0.002)])
    written["probe"] = unit(written["old-100"] + 0.002)
    found = online.online_topk(db, ["probe"], "m1", K, root, settings=settings)
    assert _top(found, "probe") == _brute_force(written, "probe") and "ivf-0-0" in _top(found, "probe")
    assert dl.held("m1") == 61
