"""Binary COPY in and out of Postgres, encoded/decoded in numpy."""
from __future__ import annotations

import numpy as np
import pytest
from similar_helpers import add_embeddings, add_listings, unit

from similar import index as ix
from similar import pgcopy
from similar import store as sdb


def test_read_streams_live_embeddings_of_one_model_in_id_order(db):
    rng = np.random.default_rng(1)
    ids = [f"L{i:04d}" for i in range(300)] + ["a:long.id-with_chars" * 5]
    vecs = unit(rng.normal(size=(len(ids), 16)))
    add_listings(db, ids, vecs, "m1")
    add_listings(db, ["gone"], vecs[:1], "m1", status="deleted")
    add_listings(db, ["other"])
    add_embeddings(db, ["other"], unit(rng.normal(size=(1, 8))), "m2")

    seen = []
    emb = sdb.read_embeddings(db, "m1", expected=10, progress=seen.append)  # capacity grows past 10
    order = np.argsort(ids)
    assert [i.decode() for i in emb.ids] == sorted(ids)  # deleted and other model left out
    np.testing.assert_array_equal(emb.vectors, vecs[order])
    assert sum(seen) == len(ids)
    assert emb.read_at is not None

    part = sdb.read_embeddings(db, "m1", "L0100", "L0200")
    assert [i.decode() for i in part.ids] == [f"L{i:04d}" for i in range(100, 200)]
    assert len(sdb.read_embeddings(db, "nope")) == 0


def test_a_streaming_read_hands_every_row_over_once_in_chunks_and_keeps_no_vectors(db, monkeypatch):
    rng = np.random.default_rng(4)
    ids = [f"S{i:04d}" for i in range(700)] + ["a-much-longer-listing-id:" + "x" * 30]
    vecs = unit(rng.normal(size=(len(ids), 8)))
    add_listings(db, ids, vecs, "m1")
    add_listings(db, ["gone"], vecs[:1], "m1", status="deleted")
    monkeypatch.setattr(pgcopy, "SINK_ROWS", 100)  # several chunks of this small catalogue
    monkeypatch.setattr(pgcopy, "READ_BATCH", 50)
    chunks = []
    emb = sdb.read_embeddings(db, "m1", sink=lambda i, v: chunks.append((i.copy(), v.copy())))
    assert len(chunks) > 3 and emb.vectors.size == 0
    got_ids = pgcopy.concat_ids([c[0] for c in chunks])
    assert list(got_ids) == list(emb.ids)  # the result's ids: those handed over, in arrival order
    got = dict(zip([i.decode() for i in got_ids], np.concatenate([c[1] for c in chunks]), strict=True))
    assert sorted(got) == sorted(ids)  # each live row once; the deleted listing left out
    for lid, vec in zip(ids, vecs, strict=True):
        np.testing.assert_array_equal(got[lid], vec)


@pytest.mark.parametrize("k", [1, 5])
def test_encoded_rows_round_trip_through_copy(db, k):
    ids = np.array([b"a", b"bb", b"a-much-longer-listing-id:42", b"d"])
    rng = np.random.default_rng(0)
    pos = rng.integers(0, len(ids), size=(len(ids), k))
    pos[1, :] = -1            # no neighbours at all: empty arrays
    if k > 1:
        pos[2, -1] = -1       # fewer than k
    scores = rng.random((len(ids), k)).astype(np.float32)
    pos, scores = ix.pack_left(pos, scores)
    db.execute("INSERT INTO similar_items_versions (version, model_version, k) VALUES (7, 'm', %s)", (k,))
    data = pgcopy.encode_neighbour_rows(7, np.arange(len(ids)), pos, scores, pgcopy.encode_id_fields(ids))
    pgcopy.copy_neighbours_in(db, "similar_items", [data])
    got = {lid: (names, sc) for lid, names, sc in db.execute(
        "SELECT listing_id, neighbour_ids, scores FROM similar_items WHERE version = 7")}
    for i, lid in enumerate(ids):
        valid = pos[i] >= 0
        names, sc = got[lid.decode()]
        assert names == [ids[j].decode() for j in pos[i][valid]]
        np.testing.assert_allclose(sc, scores[i][valid], rtol=1e-6)

