"""What the nightly, online and query paths share: the neighbour type, which model version to use,
where snapshots live, and the advisory-lock namespace."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg

from core.config import Settings

ADVISORY_NAMESPACE = "enrich.similar"


@dataclass
class Neighbour:
    listing_id: str
    score: float


def resolve_model_version(conn: psycopg.Connection, model_version: str | None = None) -> str:
    """The given model version, else the active model's, else the one with the most embeddings."""
    if model_version:
        return model_version
    row = conn.execute("SELECT model_version FROM models WHERE status = 'active'").fetchone()
    if row:
        return row[0]
    row = conn.execute(
        "SELECT model_version FROM embeddings GROUP BY model_version ORDER BY count(*) DESC LIMIT 1"
    ).fetchone()
    if row is None:
        raise LookupError("no embeddings in the database: nothing to index")
    return row[0]


def snapshot_root(settings: Settings, root: Path | str | None = None) -> Path:
    """`root` if given, else ENRICH_INDEX_DIR, else `<data dir>/index`."""
    if root is not None:
        return Path(root)
    return settings.index_dir or (settings.data_dir / "index")


def decode_ids(ids: np.ndarray) -> list[str]:
    """Listing ids as str from the fixed-width bytes that snapshots and `store.Embeddings` hold."""
    return [i.decode() for i in ids]
