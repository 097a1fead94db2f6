"""Reading shelves and live similar-items queries.

Where shelves read from
-----------------------
The view `similar_items_current (model_version, listing_id, neighbour_ids, scores, source)`
(migrations/0002) is the one place a "similar items" shelf reads. It shows, per listing:
  * the online row (table `similar_items_online`) when it was computed after the active nightly
    version read its embeddings, or when the listing is not in that version (new since);
  * otherwise the row of the active nightly version (`similar_items_active` → `similar_items`).
`read_neighbours()` reads it and also drops neighbours deleted/sold since they were computed.

Which model's shelves
---------------------
Readers use the shelf model (`common.shelf_model_version`): the active model once its own nightly
version is active, else the most recently active model that has one. After a promotion the previous
model's shelves keep serving, whole, while the backfill re-embeds the catalogue; the reindex it
enqueues when done switches `similar_items_active` for the new model and readers follow in that
commit. A rollback to a model whose shelves were kept (ENRICH_KEEP_MODEL_VERSIONS) switches back at
once.

Attribute-aware ("similar, but by <group>")
-------------------------------------------
Each attribute group has a mask m over the embedding (conditional similarity): conditioned similarity
is the inner product of L2-normalise(e ⊙ m). `similar_to(..., mask=...)` takes the mask as an array (the model's
`Predictor.condition_masks()[group]`), so this module never loads the model. A shelf embedding longer
than the mask (its category part, model/network.py shelf_embedding) is conditioned on the mask's
dimensions alone.

"This one in another colour"
----------------------------
`similar_to(..., mask=<colour mask>, other_colours=True)` ranks by the embedding with the colour
condition's dimensions taken out (`colour_free`: each dimension weighted by how little the colour mask
uses it; the category part kept) and keeps only listings whose colour tag differs from the query's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg.rows import class_row

from core.rows import fetch_row, fetch_value, fetch_values
from schemas.taxonomy import CATEGORY_GROUP, COLOUR_GROUP, TYPE_GROUP
from similar import index as ix
from similar import store as sdb
from similar.common import ACTIVE_MODEL_SQL, SHELF_MODEL_SQL, Neighbour, resolve_model_version

COLOUR_FREE_RULES = ("complement", "drop-top")


def _mask_for(vectors: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, dtype=np.float32).reshape(-1)
    if vectors.shape[-1] < mask.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} dimensions, embeddings {vectors.shape[-1]}")
    return mask


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def condition(vectors: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The embedding conditioned on an attribute group's mask: L2-normalise(e ⊙ m) over the mask's
    dimensions. No mask → the vectors unchanged."""
    if mask is None:
        return vectors
    mask = _mask_for(vectors, mask)
    return _unit(vectors[..., :mask.shape[0]] * mask)


def colour_free(vectors: np.ndarray, mask: np.ndarray, rule: str = "complement") -> np.ndarray:
    """The embedding with the colour mask's dimensions taken out, for "the same item in another colour".

    ``complement``: each dimension weighted by 1 − m/max(m), so the dimensions the colour condition
    leans on count least; ``drop-top``: the top quarter of the mask's dimensions zeroed. The image part
    keeps its length and a shelf embedding's category part is kept as it is (the same garment has the
    same category), so the result is unit length like the input."""
    mask = _mask_for(vectors, mask)
    d = mask.shape[0]
    if rule == "complement":
        weight = 1.0 - mask / max(float(mask.max()), 1e-12)
    elif rule == "drop-top":
        weight = (mask <= np.quantile(mask, 0.75)).astype(np.float32)
    else:
        raise ValueError(f"unknown rule {rule!r}; rules: {COLOUR_FREE_RULES}")
    head = vectors[..., :d]
    masked = head * weight
    scale = (np.linalg.norm(head, axis=-1, keepdims=True)
             / np.maximum(np.linalg.norm(masked, axis=-1, keepdims=True), 1e-12))
    return _unit(np.concatenate([masked * scale, vectors[..., d:]], axis=-1))


def read_neighbours(conn: psycopg.Connection, listing_id: str, model_version: str | None = None,
                    k: int | None = None) -> tuple[list[Neighbour], str | None]:
    """What the shelf shows: stored neighbours (online or nightly) minus listings deleted since.

    Without `model_version`, the shelf model (`common.shelf_model_version`) is chosen in the same
    statement that reads its rows: one snapshot, so a switch to a new model's shelves (or the pruning
    of an old model) between two statements can never show an empty or half shelf.
    """
    if model_version is None:
        shelf_model = f"coalesce(({SHELF_MODEL_SQL}), ({ACTIVE_MODEL_SQL}))"
        rows = _read_shelf(conn, shelf_model, [], listing_id, k)
        if not rows:
            (no_model,) = fetch_row(conn, f"SELECT {shelf_model} IS NULL")
            if no_model:  # no registry
                rows = _read_shelf(conn, "%s", [resolve_model_version(conn)], listing_id, k)
    else:
        rows = _read_shelf(conn, "%s", [model_version], listing_id, k)
    source = rows[0].source if rows else None
    return [Neighbour(r.listing_id, float(r.score)) for r in rows], source


@dataclass(frozen=True)
class _ShelfEntry:
    source: str  # 'online' or 'nightly'
    listing_id: str
    score: float


def _read_shelf(conn: psycopg.Connection, which: str, params: list[str], listing_id: str,
                k: int | None) -> list[_ShelfEntry]:
    with conn.cursor(row_factory=class_row(_ShelfEntry)) as cur:
        return cur.execute(
            "SELECT c.source, n.id AS listing_id, n.score FROM similar_items_current c"
            " CROSS JOIN LATERAL unnest(c.neighbour_ids, c.scores) WITH ORDINALITY AS n(id, score, ord)"
            " JOIN listings l ON l.listing_id = n.id AND l.status <> 'deleted'"
            f" WHERE c.model_version = ({which}) AND c.listing_id = %s ORDER BY n.ord LIMIT %s",
            (*params, listing_id, k or 1000),
        ).fetchall()


def listing_tag(conn: psycopg.Connection, listing_id: str, group: str) -> str | None:
    """The listing's tag value in `group`; None when it has none."""
    return fetch_value(conn, "SELECT value FROM listing_tags WHERE listing_id = %s AND tag_group = %s",
                       (listing_id, group))


def similar_to(conn: psycopg.Connection, listing_id: str, model_version: str | None = None, k: int = 20, *,
               mask: np.ndarray | None = None, same_category: bool = False,
               same_type: bool = False, other_colours: bool = False) -> list[Neighbour]:
    """Exact top-k of one listing over live listings of its model version, computed now.

    `mask`: the attribute group's mask ("similar, but by colour") — both sides
    are conditioned as L2-normalise(e ⊙ mask). `same_category` / `same_type` keep only listings
    whose 'category' / 'type' tag equals the query listing's. `other_colours`: "this one in another
    colour" — `mask` is the colour group's; ranks by `colour_free` and keeps only listings whose
    colour tag differs from the query's.
    """
    if other_colours and mask is None:
        raise ValueError("other_colours needs the colour group's condition mask")
    model_version = resolve_model_version(conn, model_version)
    query = sdb.read_embeddings(conn, model_version, only_ids=[listing_id])
    if len(query) == 0:
        raise LookupError(f"listing {listing_id!r} has no live embedding of model {model_version!r}")
    tag_filter = None
    for wanted, group in ((same_category, CATEGORY_GROUP), (same_type, TYPE_GROUP)):
        if wanted:
            value = listing_tag(conn, listing_id, group)
            if value is None:
                raise LookupError(f"listing {listing_id!r} has no {group!r} tag to filter on")
            if tag_filter is not None:
                raise ValueError("filter by one of category or type at a time")
            tag_filter = (group, value)
    cands = sdb.read_embeddings(conn, model_version, tag_filter=tag_filter)
    if other_colours:
        colour = listing_tag(conn, listing_id, COLOUR_GROUP)
        if colour is None:
            raise LookupError(f"listing {listing_id!r} has no {COLOUR_GROUP!r} tag to compare colours with")
        others = set(fetch_values(conn, "SELECT listing_id FROM listing_tags WHERE tag_group = %s AND value <> %s",
                                  (COLOUR_GROUP, colour)))
        keep = np.array([i.decode() in others for i in cands.ids], dtype=bool)
        cands = sdb.Embeddings(cands.ids[keep], cands.vectors[keep])
    if len(cands) == 0:
        return []
    if other_colours and mask is not None:  # (other_colours without a mask was refused above)
        q, c = colour_free(query.vectors, mask), colour_free(cands.vectors, mask)
    else:
        q, c = condition(query.vectors, mask), condition(cands.vectors, mask)
    scores, pos = ix.exact_topk(q, c, k + 1)
    out = []
    for s, p in zip(scores[0], pos[0], strict=True):
        if p < 0:
            continue
        cid = cands.ids[p].decode()
        if cid != listing_id:
            out.append(Neighbour(cid, float(s)))
    return out[:k]
