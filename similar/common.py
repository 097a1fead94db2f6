"""What the nightly, online and query paths share: the neighbour type, which model version to use,
where snapshots live, the advisory-lock namespace, fixed-width listing-id arrays and small query helpers."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg

from core.config import Settings
from core.rows import fetch_row, fetch_value

ADVISORY_NAMESPACE = "enrich.similar"


@dataclass
class Neighbour:
    listing_id: str
    score: float


# The model whose shelves readers see: the active model once it has an active similar-items version,
# else the most recently active model that has one (the previous model keeps serving, whole, while
# the catalogue is re-embedded under a new one and until the new version's reindex switches).
# `promoted_at` is set by every promotion and rollback, so "most recently active" is its order.
# A model rolled back from (since it was last made active) never serves: its shelves are what the
# rollback undoes, even when the restored model has none left.
SHELF_MODEL_SQL = (
    "SELECT m.model_version FROM models m"
    " JOIN similar_items_active a ON a.model_version = m.model_version"
    " WHERE (m.status = 'active' OR m.was_active)"
    "   AND NOT EXISTS (SELECT 1 FROM model_events r WHERE r.action = 'rollback'"
    "                    AND r.previous = m.model_version AND r.at >= m.promoted_at)"
    " ORDER BY (m.status = 'active') DESC, m.promoted_at DESC NULLS LAST, m.model_version LIMIT 1"
)
ACTIVE_MODEL_SQL = "SELECT model_version FROM models WHERE status = 'active'"


def shelf_model_version(conn: psycopg.Connection) -> str | None:
    """The model whose similar-items version shelves serve (see SHELF_MODEL_SQL); None when no model
    that was ever active has one."""
    return fetch_value(conn, SHELF_MODEL_SQL)


def resolve_model_version(conn: psycopg.Connection, model_version: str | None = None) -> str:
    """What readers use: the given model version, else the shelf model (`shelf_model_version`), else the
    active model's (no shelves yet: online rows only), else the one with the most embeddings."""
    if model_version:
        return model_version
    (serving,) = fetch_row(conn, f"SELECT coalesce(({SHELF_MODEL_SQL}), ({ACTIVE_MODEL_SQL}))")
    if serving is not None:
        return serving
    return _most_embedded(conn)


def reindex_model_version(conn: psycopg.Connection, model_version: str | None = None) -> str:
    """Which model the nightly reindex builds shelves for (the given one, if any).

    The active model once its catalogue backfill is 'done', when it already serves (a rollback to kept
    shelves) or when no other model's shelves could serve (the first model). Otherwise (backfill
    running, cancelled or not started yet while an earlier model's shelves serve) the serving model's
    shelves are refreshed instead, and the active model's are built by the reindex its backfill
    enqueues when it finishes: a half-embedded catalogue never replaces whole shelves.
    """
    if model_version:
        return model_version
    active, shelf, backfill = fetch_row(
        conn,
        f"SELECT ({ACTIVE_MODEL_SQL}), ({SHELF_MODEL_SQL}),"
        " (SELECT b.status FROM backfills b JOIN models m USING (model_version) WHERE m.status = 'active')",
    )
    if active is not None and (shelf is None or shelf == active or backfill == "done"):
        return active
    if shelf is not None:
        return shelf
    return _most_embedded(conn)


def _most_embedded(conn: psycopg.Connection) -> str:
    model_version = fetch_value(
        conn, "SELECT model_version FROM embeddings GROUP BY model_version ORDER BY count(*) DESC LIMIT 1")
    if model_version is None:
        raise LookupError("no embeddings in the database: nothing to index")
    return model_version


def snapshot_root(settings: Settings, root: Path | str | None = None) -> Path:
    """`root` if given, else ENRICH_INDEX_DIR, else `<data dir>/index`."""
    if root is not None:
        return Path(root)
    return settings.index_dir or (settings.data_dir / "index")


def decode_ids(ids: np.ndarray) -> list[str]:
    """Listing ids as str from the fixed-width bytes that snapshots and `store.Embeddings` hold."""
    return [i.decode() for i in ids]


def bytewise_order(ids: np.ndarray) -> np.ndarray:
    """np.argsort of fixed-width byte strings, sorting 8-byte big-endian words as integers
    (several times faster than comparing numpy strings)."""
    n, width = len(ids), ids.dtype.itemsize
    words = max(1, -(-width // 8))
    raw = np.zeros((n, 8 * words), np.uint8)
    raw[:, :width] = ids.view(np.uint8).reshape(n, width)
    keys = raw.view(">u8")
    if words == 1:
        return np.argsort(keys[:, 0], kind="stable")
    return np.lexsort(keys.T[::-1])  # lexsort's last key is the primary one
