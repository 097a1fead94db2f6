"""faiss index choice, build, search-all and local snapshots (no database)."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
from similar_helpers import clustered

from similar import index as ix
from similar import snapshots


def test_index_is_chosen_by_catalogue_size():
    assert ix.choose_factory(1_000) == "Flat"
    assert ix.choose_factory(ix.FLAT_MAX) == "Flat"
    assert ix.choose_factory(1_000_000) == "IVF4096,Flat"
    assert ix.choose_factory(100_000) == "IVF1024,Flat"
    assert ix.choose_spec(10, factory="HNSW32,Flat").factory == "HNSW32,Flat"


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,SQ8", "HNSW16,Flat"])
def test_search_all_gives_what_faiss_search_gives(factory):
    x = clustered(3000, dim=32, clusters=30, seed=3)
    spec = ix.IndexSpec(factory, nprobe=3, ef_search=64)
    index, assignment = ix.build_index(x, spec, keep_assignment=True)
    assert index.ntotal == len(x)
    seen = np.zeros(len(x), bool)
    reference = faiss.clone_index(index)
    ix.apply_search_params(reference, spec)
    for rows, scores, positions in ix.search_all(index, x, 6, assignment, batch=700):
        ref_scores, ref_positions = reference.search(x[rows], 6)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
        agree = np.mean([len(set(a) & set(b)) / 6 for a, b in zip(positions, ref_positions, strict=True)])
        assert agree > 0.999
        seen[rows] = True
    assert seen.all()  # every row answered once, in whatever order


def test_snapshot_round_trip_and_latest_pointer(tmp_path):
    x = clustered(200, dim=8, seed=4)
    ids = np.array([f"id{i:03d}".encode() for i in range(200)])
    spec = ix.IndexSpec("Flat")
    index, _ = ix.build_index(x, spec)
    m = snapshots.SnapshotManifest(model_version="model/2026:1", count=200, dim=8, spec={"factory": "Flat"},
                                   built_at="now", read_at="2026-01-01T00:00:00+00:00", similar_version=3)
    first = snapshots.save_snapshot(tmp_path, index, ids, m)
    assert first.parent.name == "model_2026_1"  # the model version cannot escape the directory
    second = snapshots.save_snapshot(tmp_path, index, ids, m)
    assert snapshots.latest_snapshot_dir(tmp_path, "model/2026:1") == second
    snap = snapshots.load_snapshot(second, "model/2026:1")
    assert snap.index.ntotal == 200 and list(snap.ids) == list(ids)
    assert snap.manifest.read_at == m.read_at
    with pytest.raises(ValueError, match="is for model"):
        snapshots.load_snapshot(second, "other")
    snapshots.save_snapshot(tmp_path, index, ids, m)
    assert len(snapshots.prune_snapshots(tmp_path, "model/2026:1", keep=1)) == 2
    assert snapshots.latest_snapshot_dir(tmp_path, "model/2026:1") is not None
    assert snapshots.latest_snapshot_dir(tmp_path, "never") is None


def test_past_compressed_min_the_index_is_built_by_streaming_and_searched_list_by_list():
    spec = ix.choose_spec(ix.COMPRESSED_MIN + 1)
    assert spec.grouped and spec.factory.endswith(",Flat") and spec.nprobe == ix.GROUPED_NPROBE
    assert not ix.choose_spec(ix.COMPRESSED_MIN).grouped
    assert not ix.choose_spec(ix.COMPRESSED_MIN + 1, factory="IVF64,Flat").grouped  # a forced factory
    with pytest.raises(ValueError, match="IVF-Flat"):
        ix.choose_spec(10, factory="HNSW32,Flat", grouped=True)


def test_two_level_centroids_give_each_vector_a_list_near_its_nearest():
    x = clustered(6000, dim=16, clusters=30, seed=9)
    levels = ix.two_level_centroids(x, 96, seed=1)
    assert len(levels.centroids) == 96 and levels.offsets[-1] == 96
    for nlist in (12, 64, 65, 200):  # exactly as many lists as asked, however the sample splits
        assert len(ix.two_level_centroids(x[:3000], nlist, seed=2).centroids) == nlist
    lists = levels.assign(x)
    assert lists.min() >= 0 and lists.max() < 96
    sims = x @ levels.centroids.T
    assert np.mean(lists == sims.argmax(1)) > 0.98  # the nearest of all, bar a few near-ties


def test_a_grouped_index_built_chunk_by_chunk_is_renumbered_in_sorted_id_order():
    x = clustered(2000, dim=16, clusters=20, seed=11)
    ids = np.array([f"id{i:05d}".encode() for i in np.random.default_rng(2).permutation(2000)])  # arrival order
    spec = ix.choose_spec(len(x), factory="IVF16,Flat", grouped=True)
    builder = ix.GroupedBuilder(x[:800], spec)
    for s in range(0, len(x), 300):
        builder.add(ids[s:s + 300], x[s:s + 300])
    order = np.argsort(ids)
    builder.finish(ids, order)
    index = builder.index
    assert index.ntotal == len(x)
    for lst in range(index.nlist):  # id i of the index is the i-th id in sorted order, with its own vector
        members, vectors = ix.list_members(index, lst)
        np.testing.assert_array_equal(vectors, x[order[members]])


def test_the_list_by_list_search_finds_the_exact_neighbours_when_it_probes_every_list():
    x = clustered(3000, dim=16, clusters=20, seed=10)
    spec = ix.choose_spec(len(x), factory="IVF24,Flat", nprobe=24, grouped=True)
    index, assignment = ix.build_index(x, spec)
    assert assignment is None and index.ntotal == len(x)
    exact_s, exact_p = ix.exact_topk(x, x, 6)
    seen = np.zeros(len(x), bool)
    for ids, scores, positions in ix.search_grouped(index, 6):
        np.testing.assert_allclose(scores, exact_s[ids], rtol=1e-5, atol=1e-5)
        # the exact top scores, and each one is its neighbour's (the order of equal scores may differ)
        np.testing.assert_allclose(np.einsum("bd,bkd->bk", x[ids], x[positions]), scores, rtol=1e-5, atol=1e-5)
        seen[ids] = True
    assert seen.all()
    # fewer lists probed: nearly as good (the lists nearest each list's centroid hold most neighbours)
    hits = sum(len(set(p) & set(exact_p[i])) for ids, _, pos in ix.search_grouped(index, 6, nprobe=4)
               for i, p in zip(ids, pos, strict=True))
    assert hits / (len(x) * 6) > 0.9


def test_drop_self_removes_the_query_or_the_last():
    pos = np.array([[0, 3, 4], [5, 6, 7], [2, 1, 9]])
    scores = np.arange(9, dtype=np.float32).reshape(3, 3)
    p, s = ix.drop_self(pos, scores, np.array([0, 1, 1]), 2)
    assert p.tolist() == [[3, 4], [5, 6], [2, 9]]
    assert s.tolist() == [[1, 2], [3, 4], [6, 8]]


def test_pack_left_moves_missing_neighbours_to_the_end_keeping_the_order():
    pos = np.array([[-1, 4, -1, 2], [1, 2, 3, 0]])
    scores = np.array([[9, 8, 7, 6], [5, 4, 3, 2]], np.float32)
    p, s = ix.pack_left(pos, scores)
    assert p.tolist() == [[4, 2, -1, -1], [1, 2, 3, 0]]
    assert s.tolist() == [[8, 6, 9, 7], [5, 4, 3, 2]]
