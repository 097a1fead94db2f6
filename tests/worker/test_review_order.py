"""The review order: expected gain of asking an item (its uncertainty, and how many uncertain look-alikes its
answer would settle), greedy with diversity; stored by the worker at insert and by `reprioritise`, beat and
`enrich review-order`."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from core.celery_app import REVIEW_ORDER_TASK, app
from core.config import Settings
from enrich.cli import app as cli
from schemas.enrichment import Enrichment, ReviewItem
from schemas.events import ListingEvent
from worker.review_order import gain_order, uncertainty
from worker.review_priority import reprioritise
from worker.store import listings_to_enrich, upsert_listings, write_enrichments

MODEL = "m-order-1"


# ------------------------------------------------------------------------------------------ pure numpy

def test_uncertainty_is_one_minus_the_margin_of_the_two_likeliest():
    assert uncertainty([["a", 0.6], ["b", 0.3], ["c", 0.1]]) == pytest.approx(0.7)
    assert uncertainty([["b", 0.3], ["a", 0.6]]) == pytest.approx(0.7)  # order of the list does not matter
    assert uncertainty([["a", 0.9]]) == pytest.approx(0.1)  # one candidate: p2 = 0
    assert uncertainty([["a", 0.45], ["b", 0.45]]) == 1.0
    assert uncertainty([["a", 1.0]]) == 0.0
    assert uncertainty([]) == 1.0


def _cluster_and_loner(rng, size: int = 6) -> np.ndarray:
    """Row 0: an item alone on its own axis; rows 1..size: a tight cluster on another axis."""
    centre = np.zeros(16)
    centre[0] = 1.0
    cluster = centre + 0.02 * rng.normal(size=(size, 16))
    cluster[:, 1] = 0.0  # orthogonal to the loner: similarity 0, not a little noise
    loner = np.zeros((1, 16))
    loner[0, 1] = 1.0
    return np.vstack([loner, cluster])


def test_an_item_in_a_dense_uncertain_cluster_is_asked_before_an_equally_uncertain_isolated_one():
    emb = _cluster_and_loner(np.random.default_rng(0))
    order, priority = gain_order(np.full(len(emb), 0.6), emb, k=10, diversity=0.5)
    assert order[0] != 0 and priority[order[0]] > priority[0]
    # the loner's gain is its uncertainty alone; the first cluster item counts its uncertain look-alikes
    assert priority[0] == pytest.approx(0.6, abs=1e-4)
    assert priority[order[0]] == pytest.approx(0.6 * (1 + 5 * 0.6), rel=0.01)
    # settled look-alikes add nothing: the same cluster, certain, and the loner goes first
    u = np.array([0.6, 0.6, 0.0, 0.0, 0.0, 0.0, 0.0])
    order, _ = gain_order(u, emb, k=10, diversity=0.5)
    assert {order[0], order[1]} == {0, 1} and order[0] in (0, 1)
    assert gain_order(u, emb)[1][0] == pytest.approx(gain_order(u, emb)[1][1], abs=1e-4)


def test_a_distinct_item_comes_before_the_near_duplicate_of_one_asked():
    emb = np.array([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.0, 0.0, 1.0]])
    u = np.array([0.5, 0.5, 0.7])  # gains: 0.5 × (1 + 0.5) = 0.75 for each duplicate, 0.7 for the distinct one
    order, _ = gain_order(u, emb, k=10, diversity=0.0)
    assert set(order[:2]) == {0, 1} and order[2] == 2  # by gain alone the duplicates come first
    order, priority = gain_order(u, emb, k=10, diversity=0.5)
    assert order[0] in (0, 1) and order[1] == 2 and order[2] in (0, 1)
    assert priority[order[2]] == pytest.approx(0.75 * 0.5, rel=0.01)  # its gain halved by the first answer


@pytest.mark.parametrize("n", [0, 1, 2, 3, 25])
def test_order_is_a_permutation_and_priority_strictly_descends_even_in_float32(n):
    rng = np.random.default_rng(n)
    emb = rng.normal(size=(n, 8))
    if n >= 3:
        emb[1] = emb[0]  # an exact duplicate: faiss may list it before the row itself
        emb[2] = 0.0  # no embedding
    for u in (rng.random(n), np.full(n, 0.5), np.zeros(n)):  # ties everywhere in the last two
        order, priority = gain_order(u, emb, k=10)
        assert sorted(order.tolist()) == list(range(n)) and priority.shape == (n,)
        ranked = priority[order].astype(np.float32)  # what a Postgres `real` keeps
        assert np.all(np.diff(ranked) < 0)
        assert np.array_equal(np.argsort(-priority.astype(np.float32)), order)
    if n == 1:
        assert gain_order(np.array([0.3]), emb)[1][0] == pytest.approx(0.3)


def test_an_unknown_diversity_or_a_size_mismatch_is_refused():
    with pytest.raises(ValueError, match="diversity"):
        gain_order(np.zeros(2), np.zeros((2, 3)), diversity=1.5)
    with pytest.raises(ValueError, match="embeddings"):
        gain_order(np.zeros(2), np.zeros((3, 3)))


# ------------------------------------------------------------------------------------------- Postgres

def queue_items(db, items: list[tuple[str, list, np.ndarray]], group: str = "colour") -> dict[str, int]:
    """Review items written through the worker's own store path, one commit each (oldest first): (listing id,
    candidates, embedding). Returns listing id → review item id."""
    events = [ListingEvent(listing_id=lid, seller_id="s1", images=[f"https://img.example/{lid}.jpg"])
              for lid, _, _ in items]
    with db.transaction():
        upsert_listings(db, events)
    todo = {t.listing_id: t for t in listings_to_enrich(db, [e.listing_id for e in events], MODEL)}
    for lid, candidates, emb in items:
        enr = Enrichment(listing_id=lid, model_version=MODEL, tags={},
                         review=[ReviewItem(group=group, candidates=candidates, threshold=0.8)])
        with db.transaction():
            write_enrichments(db, [(todo[lid], enr, np.asarray(emb, np.float32))], [])
    return dict(db.execute("SELECT listing_id, id FROM review_queue").fetchall())


def seed_cluster_and_loner(db) -> dict[str, int]:
    """The oldest item stands alone; five equally uncertain look-alikes come after it."""
    emb = _cluster_and_loner(np.random.default_rng(1), size=5)
    cand = [["red", 0.5], ["blue", 0.3]]  # uncertainty 0.8 each
    return queue_items(db, [("loner", cand, emb[0])] + [(f"c{i}", cand, emb[i]) for i in range(1, 6)])


def test_the_worker_ranks_a_new_item_by_its_own_uncertainty(db):
    ids = queue_items(db, [("a", [["red", 0.7], ["blue", 0.2]], np.ones(4)), ("b", [["red", 0.95]], np.ones(4))])
    got = dict(db.execute("SELECT id, priority FROM review_queue").fetchall())
    assert got[ids["a"]] == pytest.approx(0.5) and got[ids["b"]] == pytest.approx(0.05)


def test_reprioritise_stores_the_gain_order_of_the_open_items(db):
    ids = seed_cluster_and_loner(db)
    db.execute("UPDATE review_queue SET resolved_at = now(), priority = -7 WHERE id = %s", (ids["c5"],))
    assert reprioritise(db, Settings()) == 5
    prio = dict(db.execute("SELECT listing_id, priority FROM review_queue").fetchall())
    assert prio["c5"] == -7  # answered: left alone
    best = max(prio, key=prio.get)
    assert best.startswith("c") and prio[best] == pytest.approx(0.8 * (1 + 3 * 0.8), rel=0.02)
    assert prio["loner"] == pytest.approx(0.8, abs=1e-3)
    # its look-alikes are asked later: their gain shrank by the first answer (diversity)
    others = sorted((p for lid, p in prio.items() if lid.startswith("c") and lid not in (best, "c5")), reverse=True)
    assert len(others) == 3 and others[0] < prio[best] * 0.6
    assert len(set(prio.values())) == 6
    # a second pass changes nothing, and still counts every open item
    assert reprioritise(db, Settings()) == 5
    assert dict(db.execute("SELECT listing_id, priority FROM review_queue").fetchall()) == prio


def test_reprioritise_ranks_an_item_without_an_embedding_by_its_uncertainty(db):
    ids = seed_cluster_and_loner(db)
    db.execute("DELETE FROM embeddings WHERE listing_id = 'c1'")
    db.execute("UPDATE review_queue SET priority = NULL")
    assert reprioritise(db) == 6
    prio = dict(db.execute("SELECT id, priority FROM review_queue").fetchall())
    assert None not in prio.values() and prio[ids["c1"]] == pytest.approx(0.8, abs=1e-3)


def test_enrich_review_order_ranks_the_queue_and_says_how_many(db, pg_url):
    seed_cluster_and_loner(db)
    db.execute("UPDATE review_queue SET priority = NULL")
    res = CliRunner().invoke(cli, ["review-order", "--database-url", pg_url])
    assert res.exit_code == 0, res.output
    assert "6 open review item(s) got a priority" in res.output
    assert db.execute("SELECT count(*) FROM review_queue WHERE priority IS NULL").fetchone()[0] == 0


def test_beat_ranks_the_review_queue_on_the_cpu_queue_under_the_gain_order(use_celery):
    use_celery(Settings(cpu_queue="cpu-x", review_reprioritise_s=120, review_order="gain"))
    entry = app.conf.beat_schedule["review-order"]
    assert entry["task"] == REVIEW_ORDER_TASK and REVIEW_ORDER_TASK in app.tasks
    assert entry["options"]["queue"] == "cpu-x" and entry["schedule"] == 120.0
    use_celery(Settings(cpu_queue="cpu-x", review_order="fifo"))  # the oldest first: nothing to rank
    assert "review-order" not in app.conf.beat_schedule
