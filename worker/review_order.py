"""Which review question to ask first: the one whose answer settles the most (pure numpy; no database).

An item's expected gain is its own uncertainty plus what its answer tells about the similar open items:
    gain_i = u_i × (1 + Σ_j u_j × max(0, cos(i, j)))  over j among i's k nearest open neighbours.
A neighbour counts as much as it is itself uncertain (a settled one gains nothing) and as much as it is alike
(a far "nearest" neighbour of an isolated item counts little). The order is greedy: after an item is picked,
the gain of each of its not-yet-picked neighbours is multiplied by (1 − diversity × similarity), so the next
questions go to other regions rather than to near-duplicates of one already asked.

`worker.review_priority.reprioritise` stores the result; the worker stores `uncertainty` for a new item (its
gain with no neighbour counted, the same units), so a new item is ranked until the next refresh.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

# strict descent that survives a Postgres `real` (float32: 2**-23 relative resolution)
_STEP = 2.0 ** -20


def uncertainty(candidates: Sequence) -> float:
    """1 − (p1 − p2) over the two likeliest candidates ([[value, prob], ...]); p2 = 0 with one candidate,
    1.0 with none (nothing is known). In [0, 1]."""
    probs = sorted((float(c[1]) for c in candidates), reverse=True)
    if not probs:
        return 1.0
    p1 = probs[0]
    p2 = probs[1] if len(probs) > 1 else 0.0
    return float(min(1.0, max(0.0, 1.0 - (p1 - p2))))


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # a zero vector (no embedding) stays zero: similar to nothing
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine similarities), shape (n, k): each row's k nearest others, self left out."""
    import faiss  # lazy: the workers and the CLI start without it

    n, d = x.shape
    index = faiss.IndexFlatIP(d)
    index.add(x)
    sims, idx = index.search(x, k + 1)
    # drop the row's own entry; with exact duplicates it may not come first, or not at all (then drop the last)
    keep = idx != np.arange(n)[:, None]
    no_self = keep.all(axis=1)
    keep[no_self, -1] = False
    return idx[keep].reshape(n, k), sims[keep].reshape(n, k)


def gain_order(uncertainty: np.ndarray, embeddings: np.ndarray, k: int = 10,
               diversity: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(order, priority): item indices best first, and a strictly descending float per item (the gain it had
    when picked, nudged down where needed so that the order survives a float32 column).

    Args:
        uncertainty: (n,) values in [0, 1], e.g. `uncertainty(candidates)` per open item.
        embeddings: (n, d) vectors of the same items (any scale: cosine similarity is used).
        k: neighbours looked at per item (fewer when there are fewer other items).
        diversity: 0 = pure gain order; 1 = an exact duplicate of a picked item loses all its gain.
    """
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity must be within [0, 1], got {diversity}")
    u = np.clip(np.asarray(uncertainty, dtype=np.float64).reshape(-1), 0.0, 1.0)
    n = len(u)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    if len(embeddings) != n:
        raise ValueError(f"{n} uncertainties but {len(embeddings)} embeddings")
    kk = min(k, n - 1)
    if kk > 0:
        idx, sims = _neighbours(_normalised(embeddings), kk)
        sims = np.clip(sims.astype(np.float64), 0.0, 1.0)
        gain = u * (1.0 + (u[idx] * sims).sum(axis=1))
    else:
        idx, sims = np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0))
        gain = u.copy()

    # lazy greedy: gains only ever shrink, so a popped entry equal to the current gain is the maximum
    heap = [(-g, i) for i, g in enumerate(gain.tolist())]
    heapq.heapify(heap)
    picked = np.zeros(n, dtype=bool)
    order = np.empty(n, dtype=np.int64)
    at_pick = np.empty(n, dtype=np.float64)
    r = 0
    while heap:
        neg, i = heapq.heappop(heap)
        if picked[i] or -neg != gain[i]:
            continue  # already asked, or a stale entry (a newer, smaller one is in the heap)
        picked[i] = True
        order[r], at_pick[r] = i, gain[i]
        r += 1
        for j, s in zip(idx[i].tolist(), sims[i].tolist(), strict=True):
            if not picked[j] and s > 0 and diversity > 0:
                gain[j] *= 1.0 - diversity * s
                heapq.heappush(heap, (-gain[j], j))

    priority_ranked = at_pick.copy()
    for r in range(1, n):
        prev = priority_ranked[r - 1]
        priority_ranked[r] = min(priority_ranked[r], prev - max(abs(prev), 1.0) * _STEP)
    priority = np.empty(n, dtype=np.float64)
    priority[order] = priority_ranked
    return order, priority
