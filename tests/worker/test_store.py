"""Postgres store on the real server: idempotent upserts, one-transaction writes, corrections."""
from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from schemas.enrichment import Enrichment, ReviewItem, TagSource, TagValue
from schemas.events import CorrectionEvent, ListingEvent
from similar.store import read_embeddings
from worker.store import (
    StoredTag,
    claim_stale_pending,
    content_hash,
    listings_to_enrich,
    record_correction,
    tags_of,
    upsert_listings,
    write_enrichments,
)


def _ev(lid="l1", **kw) -> ListingEvent:
    base = dict(listing_id=lid, seller_id="s1", images=[f"/img/{lid}.png"], title="a shirt")
    base.update(kw)
    return ListingEvent(**base)


def _count(db, table: str) -> int:
    return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_content_hash_ignores_event_id_but_not_content():
    assert content_hash(_ev(event_id="a")) == content_hash(_ev(event_id="b"))
    assert content_hash(_ev()) != content_hash(_ev(title="a red shirt"))


def test_upsert_is_idempotent_and_edits_reset_to_pending(db):
    with db.transaction():
        r1 = upsert_listings(db, [_ev("l1"), _ev("l2")])
    assert sorted(r1.changed) == ["l1", "l2"] and sorted(r1.pending) == ["l1", "l2"]
    db.execute("UPDATE listings SET status = 'enriched', enriched_hash = content_hash WHERE listing_id = 'l1'")
    with db.transaction():
        r2 = upsert_listings(db, [_ev("l1", event_id="replay-1"), _ev("l2")])
    assert r2.changed == [] and r2.pending == ["l2"]  # l2 never finished: enqueue it again
    with db.transaction():
        r3 = upsert_listings(db, [_ev("l1", title="edited")])
    assert r3.changed == ["l1"] and r3.pending == ["l1"]
    assert _count(db, "listings") == 2


def test_later_event_in_one_batch_wins(db):
    with db.transaction():
        upsert_listings(db, [_ev("l1", title="first"), _ev("l1", title="second")])
    assert db.execute("SELECT event->>'title' FROM listings").fetchone()[0] == "second"


def test_deleted_listing_drops_embedding_and_is_not_pending(db):
    with db.transaction():
        upsert_listings(db, [_ev("l1")])
    db.execute("INSERT INTO embeddings VALUES ('l1', 'm1', 2, %s)", (np.ones(2, "<f4").tobytes(),))
    with db.transaction():
        r = upsert_listings(db, [_ev("l1", deleted=True)])
    assert r.deleted == ["l1"] and r.pending == []
    assert _count(db, "embeddings") == 0


def _enrichment(lid: str) -> Enrichment:
    return Enrichment(listing_id=lid, model_version="m1", tags={
        "category": TagValue(value="Dress", source=TagSource.predicted, confidence=0.9, model_version="m1"),
        "colour": TagValue(value="red", source=TagSource.seller)},
        review=[ReviewItem(group="type", candidates=[("full-body", 0.4), ("top", 0.3)], threshold=0.5)])


def test_write_enrichments_rerun_changes_nothing(db):
    with db.transaction():
        upsert_listings(db, [_ev("l1"), _ev("l2")])
    items = listings_to_enrich(db, ["l1", "l2"], "m1")
    rows = [(items[0], _enrichment("l1"), np.array([0.6, 0.8], np.float32))]
    with db.transaction():
        write_enrichments(db, rows, [(items[1], "no usable image: corrupt")])
    snapshot = lambda: [db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in  # noqa: E731
                        ("listing_tags", "embeddings")] + [
        db.execute("SELECT listing_id, tag_group, candidates FROM review_queue").fetchall()]
    first = [list(t) for t in snapshot()]
    with db.transaction():
        write_enrichments(db, rows, [(items[1], "no usable image: corrupt")])
    again = snapshot()
    assert [[r[:4] for r in t] for t in first] == [[r[:4] for r in t] for t in again]
    assert _count(db, "listing_tags") == 2 and _count(db, "embeddings") == 1 and _count(db, "review_queue") == 1
    status = dict(db.execute("SELECT listing_id, status FROM listings").fetchall())
    assert status == {"l1": "enriched", "l2": "failed"}
    vec = np.frombuffer(db.execute("SELECT vector FROM embeddings").fetchone()[0], "<f4")
    assert np.allclose(vec, [0.6, 0.8])
    # both are done for m1 now: a rerun of the task finds nothing to do; a new model re-embeds l1 only
    assert listings_to_enrich(db, ["l1", "l2"], "m1") == []
    assert [i.listing_id for i in listings_to_enrich(db, ["l1", "l2"], "m2")] == ["l1"]


def test_edit_during_enrichment_leaves_listing_pending(db):
    with db.transaction():
        upsert_listings(db, [_ev("l1")])
    (item,) = listings_to_enrich(db, ["l1"], "m1")
    with db.transaction():
        upsert_listings(db, [_ev("l1", title="edited meanwhile")])
    with db.transaction():
        write_enrichments(db, [(item, _enrichment("l1"), np.ones(2, np.float32))], [])
    assert db.execute("SELECT status FROM listings").fetchone()[0] == "pending"


def test_correction_becomes_current_value_and_survives_reenrichment(db):
    with db.transaction():
        upsert_listings(db, [_ev("l1")])
    (item,) = listings_to_enrich(db, ["l1"], "m1")
    with db.transaction():
        write_enrichments(db, [(item, _enrichment("l1"), np.ones(2, np.float32))], [])
    ev = CorrectionEvent(event_id="c1", listing_id="l1", group="category", old_value="Dress", new_value="Coat",
                         corrected_by="moderator-7", corrected_at=datetime(2026, 1, 2, tzinfo=UTC))
    with db.transaction():
        assert record_correction(db, ev) is True
        assert record_correction(db, ev) is False  # replay
    assert tags_of(db, "l1")["category"] == StoredTag("category", "Coat", "corrected", None, None)
    (item,) = listings_to_enrich(db, ["l1"], "m2")
    with db.transaction():
        write_enrichments(db, [(item, _enrichment("l1"), np.ones(2, np.float32))], [])
    assert tags_of(db, "l1")["category"].source == "corrected"
    assert _count(db, "corrections") == 1


def test_reenrichment_sends_no_review_item_for_a_group_a_person_corrected(db):
    with db.transaction():
        upsert_listings(db, [_ev("l1")])
    (item,) = listings_to_enrich(db, ["l1"], "m1")
    with db.transaction():
        write_enrichments(db, [(item, _enrichment("l1"), np.ones(2, np.float32))], [])
    assert _count(db, "review_queue") == 1  # the model was unsure of the type
    with db.transaction():
        record_correction(db, CorrectionEvent(event_id="c1", listing_id="l1", group="type", new_value="top",
                                              corrected_by="moderator-7",
                                              corrected_at=datetime(2026, 1, 2, tzinfo=UTC)))
    (item,) = listings_to_enrich(db, ["l1"], "m2")  # a new model re-enriches (backfill)
    with db.transaction():
        write_enrichments(db, [(item, _enrichment("l1"), np.ones(2, np.float32))], [])
    assert db.execute("SELECT count(*) FROM review_queue WHERE resolved_at IS NULL").fetchone()[0] == 0
    assert tags_of(db, "l1")["type"] == StoredTag("type", "top", "corrected", None, None)


def test_a_swept_listing_is_not_queued_again_until_it_is_stale_again(db):
    """Under a backlog longer than the sweep interval, a claimed listing waits for its task rather than
    collecting a duplicate per sweep; oldest first."""
    with db.transaction():
        upsert_listings(db, [ListingEvent(listing_id=lid, seller_id="s", images=["https://example.com/a.jpg"])
                             for lid in ("b-old", "a-older", "fresh")])
        db.execute("UPDATE listings SET updated_at = now() - interval '2 hours' WHERE listing_id = 'b-old'")
        db.execute("UPDATE listings SET updated_at = now() - interval '3 hours' WHERE listing_id = 'a-older'")
    with db.transaction():
        assert claim_stale_pending(db, 1800) == ["a-older", "b-old"]
    with db.transaction():
        assert claim_stale_pending(db, 1800) == []  # claimed: not again within the threshold
    with db.transaction():
        # past a (here zero) threshold they come back, ordered by their last change (the claim for two)
        assert claim_stale_pending(db, 0) == ["fresh", "a-older", "b-old"]



def test_a_listing_edited_back_to_what_was_enriched_is_not_left_pending(db):
    with db.transaction():
        upsert_listings(db, [_ev("l1")])
    (item,) = listings_to_enrich(db, ["l1"], "m1")
    with db.transaction():
        write_enrichments(db, [(item, _enrichment("l1"), np.ones(2, np.float32))], [])
    with db.transaction():
        upsert_listings(db, [_ev("l1", title="edited")])
    with db.transaction():
        r = upsert_listings(db, [_ev("l1")])  # edited back before a worker saw the edit
    assert r.pending == ["l1"]
    # the task the intake sends for it must finish it, or it stays pending and is swept for ever
    assert [i.listing_id for i in listings_to_enrich(db, ["l1"], "m1")] == ["l1"]


def test_a_re_embedded_listing_is_new_to_a_reader_that_saw_its_old_vector(db):
    """The online delta reads what a pg_snapshot did not see: rewriting an embedding must count as new."""
    with db.transaction():
        upsert_listings(db, [_ev("l1")])
    (item,) = listings_to_enrich(db, ["l1"], "m1")
    with db.transaction():
        write_enrichments(db, [(item, _enrichment("l1"), np.ones(2, np.float32))], [])
    seen = read_embeddings(db, "m1")
    assert len(seen) == 1 and len(read_embeddings(db, "m1", not_visible_in=seen.read_snapshot)) == 0
    with db.transaction():
        upsert_listings(db, [_ev("l1", title="edited")])
    (item,) = listings_to_enrich(db, ["l1"], "m1")
    with db.transaction():
        write_enrichments(db, [(item, _enrichment("l1"), np.full(2, 2.0, np.float32))], [])
    again = read_embeddings(db, "m1", not_visible_in=seen.read_snapshot)
    assert again.ids.tolist() == [b"l1"] and again.vectors.tolist() == [[2.0, 2.0]]
