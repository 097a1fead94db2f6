"""Helpers for the similar-items tests: small synthetic catalogues written to the real Postgres."""
from __future__ import annotations

import json

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def add_listings(db, ids, vectors=None, model_version="m1", status="enriched", tags=None, images=None):
    """Insert listings (and their embeddings of `model_version` when vectors are given)."""
    tags = tags or {}
    with db.cursor() as cur:
        with cur.copy("COPY listings (listing_id, seller_id, event, content_hash, status) FROM STDIN") as cp:
            for i, lid in enumerate(ids):
                event = {"listing_id": lid, "seller_id": "s1",
                         "images": [images[i] if images else f"s3://bucket/{lid}.jpg"]}
                cp.write_row((lid, "s1", json.dumps(event), "h", status))
        if vectors is not None:
            add_embeddings(db, ids, vectors, model_version)
        rows = [(lid, group, value, "seller") for lid, groups in tags.items() for group, value in groups.items()]
        if rows:
            cur.executemany("INSERT INTO listing_tags (listing_id, tag_group, value, source) VALUES (%s, %s, %s, %s)",
                            rows)


def add_embeddings(db, ids, vectors, model_version="m1"):
    vectors = np.asarray(vectors, dtype="<f4")
    with db.cursor() as cur, cur.copy(
        "COPY embeddings (listing_id, model_version, dim, vector) FROM STDIN"
    ) as cp:
        for lid, v in zip(ids, vectors, strict=True):
            cp.write_row((lid, model_version, vectors.shape[1], v.tobytes()))


def exact_neighbours(vectors: np.ndarray, ids: list[str], k: int) -> dict[str, list[str]]:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return {ids[i]: [ids[j] for j in order[i]] for i in range(len(ids))}


def clustered(n: int, dim: int = 32, clusters: int = 10, seed: int = 0, noise: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return unit(centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)))


