"""faiss indexes for similar items: choose one by catalogue size, build it, search it in batches.

Vectors are L2-normalised, so inner product = cosine; every index uses METRIC_INNER_PRODUCT.
Choice (faiss wiki, "Guidelines to choose an index"): exact `Flat` while a brute-force pass over the
catalogue is cheap; beyond that `IVF{nlist},Flat` with nlist ≈ 4·√n, tuned by nprobe. Any
index-factory string (e.g. "HNSW32,Flat", "IVF4096,SQ8") can be forced through `factory=`.

Past COMPRESSED_MIN vectors (a "grouped" `IVF{n/LIST_SIZE},Flat`) two float32 copies no longer fit a
modest machine and one query at a time is too slow for the whole catalogue, so: the lists come from a
two-level k-means (`TwoLevel`: assigning n vectors to 64 top centroids and then to their sub-centroids
costs a sliver of a pass over all nlist) trained on a sample; the vectors stream from the database
straight into the lists (`GroupedBuilder`), the only copy; and the nightly search runs list by list
(`search_grouped`): the members of one list are searched together, with one matrix product, among the
members of the `nprobe` lists nearest to that list's centroid — dense products on contiguous blocks,
at BLAS speed. The vectors stay float32: near-duplicate photos' top-20 lie so close in cosine that
float16 rounding alone reorders it (benchmarks/RESULTS.md, similar items).

Saving and loading an index with its ids is similar/snapshots.py.
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

FLAT_MAX = 50_000            # up to here exact search of everything is cheap enough (n² d flops)
DEFAULT_NPROBE = 4           # IVF lists searched per query: recall against time (benchmarks/similar_nightly.py)
DEFAULT_EF_SEARCH = 64
TRAIN_POINTS_PER_LIST = 40   # k-means sample per IVF list: 39 is faiss's minimum, 256 its default cap
KMEANS_ITERATIONS = 10      # coarse centroids need not be converged for IVF recall (faiss default 25)
SEARCH_BATCH = 16_384
COMPRESSED_MIN = 2_000_000  # beyond: streamed into lists from a two-level k-means, searched list by list
LIST_SIZE = 1200            # vectors per list of such an index: a list searches nprobe × this many
GROUPED_NPROBE = 8          # lists each list searches: recall against time (benchmarks/RESULTS.md)
TOP_LISTS = 64              # first level of the two-level k-means
TOP_PROBE = 3               # top centroids whose sub-centroids a vector is compared with


@dataclass(frozen=True)
class IndexSpec:
    """How an index is built and searched; stored in the snapshot manifest and version params."""

    factory: str
    nprobe: int = DEFAULT_NPROBE
    ef_search: int = DEFAULT_EF_SEARCH
    train_points: int | None = None  # None = all vectors (or TRAIN_POINTS_PER_LIST × nlist for IVF)
    grouped: bool = False  # IVF-Flat from a two-level k-means, built by streaming, searched list by list


def choose_factory(n: int, flat_max: int = FLAT_MAX) -> str:
    """Exact for small catalogues, IVF-Flat beyond (nlist a power of two near 4·√n, ≥ 39 points per list),
    lists of about LIST_SIZE vectors past COMPRESSED_MIN (searched list by list: `IndexSpec.grouped`)."""
    if n <= flat_max:
        return "Flat"
    if n > COMPRESSED_MIN:
        return f"IVF{2 ** round(math.log2(n / LIST_SIZE))},Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = max(16, min(nlist, n // 39))
    return f"IVF{nlist},Flat"


def choose_spec(n: int, factory: str | None = None, nprobe: int | None = None,
                ef_search: int | None = None, flat_max: int = FLAT_MAX, grouped: bool | None = None) -> IndexSpec:
    """`grouped` (default: past COMPRESSED_MIN, when no factory is forced) needs an "IVF{nlist},Flat" factory."""
    grouped = (factory is None and n > COMPRESSED_MIN) if grouped is None else grouped
    factory = factory or choose_factory(n, flat_max)
    if grouped and not re.fullmatch(r"IVF\d+,Flat", factory):
        raise ValueError(f"a grouped index is an IVF-Flat, not {factory!r}")
    return IndexSpec(factory=factory, nprobe=nprobe or (GROUPED_NPROBE if grouped else DEFAULT_NPROBE),
                     ef_search=ef_search or DEFAULT_EF_SEARCH, grouped=grouped)


def ivf_nlist(index: faiss.Index) -> int | None:
    """The number of lists of an IVF index (inside whatever wraps it); None for any other index."""
    import faiss  # lazy: the CLI starts without faiss

    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else ivf.nlist


def apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    """Set nprobe / efSearch on whatever the factory string built."""
    import faiss  # lazy: the CLI starts without faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(spec.nprobe, ivf.nlist)
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = spec.ef_search


def build_index(vectors: np.ndarray, spec: IndexSpec, seed: int = 1234, *, keep_assignment: bool = False
                ) -> tuple[faiss.Index, tuple[np.ndarray, np.ndarray] | None]:
    """Train (when the index needs it) on a sample and add all vectors; row i of `vectors` gets id i.

    For an IVF index the coarse assignment of every vector to its `nprobe` nearest lists is computed
    once: its first column places the vector (what `add` would compute), and with
    `keep_assignment=True` the whole (n, nprobe) assignment is returned for `search_all`, which
    then needs no second quantizer pass. Returns (index, assignment or None).
    A grouped spec (`IndexSpec.grouped`) goes through `GroupedBuilder` (no assignment).
    """
    import faiss  # lazy: the CLI starts without faiss

    if spec.grouped:
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=min(sample_size(spec), len(vectors)),
                                                          replace=False))
        builder = GroupedBuilder(_f32(vectors[rows]), spec, seed)
        for s in range(0, len(vectors), SEARCH_BATCH):
            builder.add(None, vectors[s:s + SEARCH_BATCH])
        return builder.index, None
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    index = faiss.index_factory(d, spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if not index.is_trained:
        nlist = ivf_nlist(index)
        budget = spec.train_points or (TRAIN_POINTS_PER_LIST * nlist if nlist else n)
        if budget < n:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=budget, replace=False))
            sample = vectors[rows]
        else:
            sample = vectors
        if ivf is not None:
            ivf.cp.niter = KMEANS_ITERATIONS
            ivf.cp.seed = seed
        t0 = time.perf_counter()
        index.train(sample)
        log.info("trained %s on %d vectors in %.1fs", spec.factory, len(sample), time.perf_counter() - t0)
        del sample
    apply_search_params(index, spec)
    t0 = time.perf_counter()
    assignment = None
    bare = faiss.downcast_index(index)
    if isinstance(bare, faiss.IndexIVF):  # a bare IVF: no transform or refine around it
        assignment = assign_lists(bare, vectors, bare.nprobe)
        first = np.ascontiguousarray(assignment[1][:, 0])
        bare.add_core(n, faiss.swig_ptr(vectors), None, faiss.swig_ptr(first))
        if not keep_assignment:
            assignment = None
    else:
        index.add(vectors)
    log.info("added %d vectors to %s in %.1fs", n, spec.factory, time.perf_counter() - t0)
    return index, assignment


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _knn(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k by blocked matrix products (faiss.knn: BLAS, then a heap per query)."""
    import faiss  # lazy: the CLI starts without faiss

    return faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss  # lazy: the CLI starts without faiss

    km = faiss.Kmeans(x.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True, min_points_per_centroid=1)
    km.train(_f32(x))
    assert km.centroids is not None, "training sets the centroids"
    return km.centroids


@dataclass
class TwoLevel:
    """Centroids of a two-level k-means: sub-centroids of top list t are rows offsets[t]:offsets[t+1]."""

    top: np.ndarray
    centroids: np.ndarray
    offsets: np.ndarray

    def assign(self, x: np.ndarray) -> np.ndarray:
        """The list of each row of x: the nearest sub-centroid of its TOP_PROBE nearest top centroids (a
        vector near the border of two top lists often belongs to a sub-list of the other one)."""
        x = _f32(x)
        tops = _knn(x, self.top, min(TOP_PROBE, len(self.top)))[1]
        best = np.full(len(x), -np.inf, np.float32)
        out = np.zeros(len(x), np.int64)
        for t in range(len(self.top)):
            rows = np.flatnonzero((tops == t).any(axis=1))
            if len(rows):
                lo, hi = self.offsets[t], self.offsets[t + 1]
                score, pos = _knn(x[rows], self.centroids[lo:hi], 1)
                better = score[:, 0] > best[rows]
                best[rows[better]], out[rows[better]] = score[better, 0], lo + pos[better, 0]
        return out


def two_level_centroids(sample: np.ndarray, nlist: int, seed: int = 1234) -> TwoLevel:
    """nlist centroids as TOP_LISTS top centroids, each split by its own k-means into a share of nlist
    proportional to its members in the sample (at least one each)."""
    top_n = max(1, min(TOP_LISTS, nlist, len(sample)))
    top = _kmeans(sample, top_n, seed)
    members = _knn(_f32(sample), top, 1)[1][:, 0]
    counts = np.bincount(members, minlength=top_n)
    share = np.maximum(1, np.floor(counts / max(1, counts.sum()) * nlist).astype(np.int64))
    share = np.minimum(share, np.maximum(counts, 1))
    for t in np.argsort(-(counts - share))[: max(0, nlist - share.sum())]:  # the remainder to the fullest
        share[t] += 1
    while share.sum() > nlist:  # the one-each minimum overshot: take back from the biggest
        share[np.argmax(share)] -= 1
    parts = []
    for t in range(top_n):
        mine = sample[members == t]
        parts.append(top[t:t + 1] if share[t] == 1 or len(mine) <= share[t]
                     else _kmeans(mine, int(share[t]), seed + t))
    centroids = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    return TwoLevel(top, centroids, np.concatenate([[0], np.cumsum([len(p) for p in parts])]))


def _nlist_of(factory: str) -> int:
    found = re.match(r"IVF(\d+)", factory)
    if found is None:
        raise ValueError(f"a grouped index is an IVF-Flat, not {factory!r}")
    return int(found.group(1))


def sample_size(spec: IndexSpec) -> int:
    """Vectors a grouped index's k-means trains on."""
    return spec.train_points or TRAIN_POINTS_PER_LIST * _nlist_of(spec.factory)


class GroupedBuilder:
    """Builds a grouped index while the vectors stream in: `add` chunk after chunk (each vector's id is
    its arrival position), then `finish` with every id read to renumber the lists in sorted-id order."""

    def __init__(self, sample: np.ndarray, spec: IndexSpec, seed: int = 1234) -> None:
        import faiss  # lazy: the CLI starts without faiss

        t0 = time.perf_counter()
        self.levels = two_level_centroids(_f32(sample), _nlist_of(spec.factory), seed)
        d = sample.shape[1]
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(self.levels.centroids)
        # the lists are the two-level centroids (fewer than asked when the sample was small)
        self.index = faiss.IndexIVFFlat(quantizer, d, len(self.levels.centroids), faiss.METRIC_INNER_PRODUCT)
        self.index.own_fields = True  # the index frees its quantizer, as one from index_factory does
        quantizer.this.disown()  # type: ignore[attr-defined]  # every SWIG proxy has `this`; the stubs omit it
        apply_search_params(self.index, spec)
        self.added = 0
        log.info("two-level centroids for %d lists in %.1fs", self.index.nlist, time.perf_counter() - t0)

    def add(self, _ids: np.ndarray | None, vectors: np.ndarray) -> None:
        """Add a chunk to the lists (a `store.read_embeddings` sink; its ids are kept by the reader)."""
        import faiss  # lazy: the CLI starts without faiss

        batch = _f32(vectors)
        lists = self.levels.assign(batch)
        ids = np.arange(self.added, self.added + len(batch), dtype=np.int64)
        # named, so the arrays outlive the call that reads them through raw pointers
        self.index.add_core(len(batch), faiss.swig_ptr(batch), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        self.added += len(batch)

    def finish(self, arrival_ids: np.ndarray, order: np.ndarray) -> None:
        """Renumber the lists so a vector's id is its position in `arrival_ids[order]` (sorted ids)."""
        import faiss  # lazy: the CLI starts without faiss

        if len(arrival_ids) != self.added:
            raise ValueError(f"{len(arrival_ids)} ids for {self.added} vectors")
        position = np.empty(len(order), np.int64)
        position[order] = np.arange(len(order))
        inv = self.index.invlists
        assert inv is not None, "an IndexIVFFlat owns its lists"
        for lst in range(self.index.nlist):
            size = inv.list_size(lst)
            if size:
                ids = faiss.rev_swig_ptr(inv.get_ids(lst), size)  # the list's own memory, renumbered in place
                ids[:] = position[ids]


def list_members(index: faiss.IndexIVF, lst: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of one list of an IVF-Flat index (copies: the lists may change later)."""
    import faiss  # lazy: the CLI starts without faiss

    inv = index.invlists
    assert inv is not None, "an IVF index read or built here owns its lists"
    size = inv.list_size(lst)
    if size == 0:
        return np.empty(0, np.int64), np.empty((0, index.d), np.float32)
    ids = faiss.rev_swig_ptr(inv.get_ids(lst), size).copy()
    codes = faiss.rev_swig_ptr(inv.get_codes(lst), size * index.code_size)
    return ids, codes.view(np.float32).reshape(size, index.d).copy()


def list_ids(index: faiss.Index, lst: int) -> np.ndarray:
    """The ids in one list of an IVF index (a copy)."""
    import faiss  # lazy: the CLI starts without faiss

    inv = faiss.extract_index_ivf(index).invlists
    assert inv is not None, "an IVF index read or built here owns its lists"
    size = inv.list_size(lst)
    return faiss.rev_swig_ptr(inv.get_ids(lst), size).copy() if size else np.empty(0, np.int64)


def search_grouped(index: faiss.Index, k: int, nprobe: int | None = None,
                   lists: range | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Top-k of every indexed vector (or of the members of `lists`), list by list: yields (ids, scores, ids
    of neighbours) per list.

    The members of list L are searched exactly among the members of the `nprobe` lists whose centroids
    are nearest L's (L first): one matrix product per list instead of one scan per query."""
    import faiss  # lazy: the CLI starts without faiss

    ivf = faiss.extract_index_ivf(index)
    nlist = ivf.nlist
    centroids = ivf.quantizer.reconstruct_n(0, nlist)
    probe = min(nprobe or ivf.nprobe, nlist)
    near = _knn(centroids, centroids, probe)[1]
    for lst in range(nlist) if lists is None else lists:
        ids, queries = list_members(ivf, lst)
        if not len(ids):
            continue
        parts = [list_members(ivf, int(m)) for m in near[lst] if m >= 0]
        base_ids = np.concatenate([p[0] for p in parts])
        scores, pos = _knn(queries, np.concatenate([p[1] for p in parts]), min(k, len(base_ids)))
        found = np.where(pos >= 0, base_ids[np.maximum(pos, 0)], -1)
        if found.shape[1] < k:  # fewer candidates than k: pad as faiss does
            found = np.pad(found, ((0, 0), (0, k - found.shape[1])), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, k - scores.shape[1])), constant_values=-np.inf)
        yield ids, scores, found


def assign_lists(ivf: faiss.IndexIVF, vectors: np.ndarray, nprobe: int,
                 batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, lists): each vector's `nprobe` nearest IVF lists, in batches."""
    batch = batch or SEARCH_BATCH
    n = len(vectors)
    dq = np.empty((n, nprobe), np.float32)
    iq = np.empty((n, nprobe), np.int64)
    for s in range(0, n, batch):
        dq[s:s + batch], iq[s:s + batch] = ivf.quantizer.search(_f32(vectors[s:s + batch]), nprobe)
    return dq, iq


def search_batches(index: faiss.Index, queries: np.ndarray, k: int,
                   batch: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (start row, scores, positions) per batch so the caller can write as it goes."""
    batch = batch or SEARCH_BATCH
    for start in range(0, len(queries), batch):
        q = np.ascontiguousarray(queries[start:start + batch], dtype=np.float32)
        scores, positions = index.search(q, k)
        yield start, scores, positions


def exact_topk(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k (scores, positions) of each query among `vectors`, best first; -1 pads."""
    queries = np.atleast_2d(queries).astype(np.float32, copy=False)
    n = len(vectors)
    if n == 0:
        return (np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64))
    sims = queries @ np.asarray(vectors, dtype=np.float32).T
    kk = min(k, n)
    part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    part_scores = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    positions = np.take_along_axis(part, order, axis=1).astype(np.int64)
    scores = np.take_along_axis(part_scores, order, axis=1)
    if kk < k:
        positions = np.pad(positions, ((0, 0), (0, k - kk)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
    return scores.astype(np.float32), positions


def search_all(index: faiss.Index, vectors: np.ndarray, k: int,
               assignment: tuple[np.ndarray, np.ndarray] | None = None,
               batch: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Top-k of every row of `vectors` (the indexed vectors themselves): yields (rows, scores, positions).

    With an IVF assignment from `build_index`, queries go in order of their nearest list, so
    consecutive queries probe mostly the same lists and those stay in cache (a scan in index order
    is memory-bound), and the coarse quantizer is not run a second time. Same results as
    `index.search` with the same nprobe.
    """
    import faiss  # lazy: the CLI starts without faiss

    batch = batch or SEARCH_BATCH
    ivf = faiss.downcast_index(index)
    if assignment is None or not isinstance(ivf, faiss.IndexIVF):
        for start, scores, positions in search_batches(index, vectors, k, batch):
            yield np.arange(start, start + len(positions)), scores, positions
        return
    dq, iq = assignment
    order = np.argsort(iq[:, 0], kind="stable")
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        # the stubs list the raw SWIG signature before the numpy wrapper's overloads, and mypy takes the first
        scores, positions = ivf.search_preassigned(  # type: ignore[call-arg, func-returns-value, misc]
            vectors[rows], k, iq[rows], dq[rows])  # type: ignore[arg-type]
        yield rows, scores, positions


def drop_self(positions: np.ndarray, scores: np.ndarray, self_pos: np.ndarray,
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """From k+1 results per row remove the query itself (or the last one when it is absent)."""
    is_self = positions == self_pos[:, None]
    drop = is_self.copy()
    no_self = ~is_self.any(axis=1)
    drop[no_self, -1] = True
    # a row could contain itself twice only with duplicated ids; keep exactly k columns
    first = np.argmax(drop, axis=1)
    keep = np.ones_like(drop)
    keep[np.arange(len(drop)), first] = False
    return positions[keep].reshape(len(drop), k), scores[keep].reshape(len(drop), k)


def pack_left(positions: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move valid results (position ≥ 0) to the left of each row, keeping their order."""
    invalid = positions < 0
    if not invalid.any():
        return positions, scores
    order = np.argsort(invalid, axis=1, kind="stable")
    return np.take_along_axis(positions, order, axis=1), np.take_along_axis(scores, order, axis=1)
