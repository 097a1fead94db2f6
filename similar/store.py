"""Postgres side of similar items: stream embeddings out, COPY neighbours in, switch versions.

Reads use one binary `COPY (SELECT ...) TO STDOUT`: rows arrive in chunks and are decoded into a
preallocated float32 array (little-endian bytes straight into numpy); no per-row Python lists of
floats. Writes build PostgreSQL's binary COPY format for whole chunks of rows with numpy
(`encode_rows`) rather than calling `write_row` per row.

Versions (tables in migrations/0001 and 0002):
  similar_items_versions  building → ready → retired   (or failed)
  similar_items_active    model_version → the one version readers see
A new version is written under status 'building' and only becomes visible through one short
transaction that flips similar_items_active; readers that join through the active table in one
statement see the old version or the new one, whole. A crash before the switch leaves the active
row untouched; the leftover 'building' version is marked failed and deleted by the next run.

Old models: `prune_model_version` deletes the embeddings, online rows and versions of a model that was
active once but is neither among the last ENRICH_KEEP_MODEL_VERSIONS active ones nor the one whose
shelves serve (`kept_model_versions`).
"""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import psycopg
from psycopg import sql

from similar.common import SHELF_MODEL_SQL

log = logging.getLogger(__name__)

_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_COPY_HEADER = _COPY_SIGNATURE + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_TEXT_OID = 25
_FLOAT4_OID = 700
ENCODE_CHUNK = 16_384


@dataclass
class Embeddings:
    """Listing ids (fixed-width bytes, sorted bytewise) and their vectors, row-aligned."""

    ids: np.ndarray
    vectors: np.ndarray
    read_at: str | None = None  # now() of the reading transaction (ISO): what was committed by then is here

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------------------------
# reading

def _live_filter(alias: str = "l") -> sql.Composable:
    # a listing the seller deleted or sold has status 'deleted' (ListingEvent.deleted)
    return sql.SQL("{}.status <> 'deleted'").format(sql.Identifier(alias))


def embeddings_query(model_version: str, lo: str | None = None, hi: str | None = None,
                     created_after: str | None = None, only_ids: list[str] | None = None,
                     tag_filter: tuple[str, str] | None = None) -> tuple[sql.Composable, list]:
    """SELECT listing_id, vector of live listings for one model version (in no particular order:
    sorting 1 GB of vectors in Postgres costs more than sorting the ids in numpy)."""
    where = [sql.SQL("e.model_version = %s"), _live_filter()]
    params: list = [model_version]
    # id ranges compare bytes (COLLATE "C"), the order numpy sorts ids in, whatever the database locale
    if lo is not None:
        where.append(sql.SQL('e.listing_id COLLATE "C" >= %s'))
        params.append(lo)
    if hi is not None:
        where.append(sql.SQL('e.listing_id COLLATE "C" < %s'))
        params.append(hi)
    if created_after is not None:
        where.append(sql.SQL("e.created_at > %s::timestamptz"))
        params.append(created_after)
    if only_ids is not None:
        where.append(sql.SQL("e.listing_id = ANY(%s)"))
        params.append(list(only_ids))
    join = sql.SQL("")
    if tag_filter is not None:
        join = sql.SQL(" JOIN listing_tags t ON t.listing_id = e.listing_id AND t.tag_group = %s AND t.value = %s")
        params = [tag_filter[0], tag_filter[1], *params]
    query = sql.SQL(
        "SELECT e.listing_id, e.vector FROM embeddings e JOIN listings l ON l.listing_id = e.listing_id"
        "{join} WHERE {where}"
    ).format(join=join, where=sql.SQL(" AND ").join(where))
    return query, params


def count_embeddings(conn: psycopg.Connection, model_version: str, lo: str | None = None,
                     hi: str | None = None) -> tuple[int, int | None]:
    """(number of live embeddings, their dimension) for a model version / id range."""
    query, params = embeddings_query(model_version, lo, hi)
    row = conn.execute(
        sql.SQL("SELECT count(*), max(length(q.vector)) / 4 FROM ({}) q").format(query), params
    ).fetchone()
    return int(row[0]), (int(row[1]) if row[1] is not None else None)


class _CopyDecoder:
    """Incremental decoder of binary COPY rows (listing_id text, vector bytea of 4·dim bytes)."""

    def __init__(self, dim: int, capacity: int, on_rows=None):
        self.dim = dim
        self.vec_bytes = 4 * dim
        self.vectors = np.empty((max(capacity, 1), dim), dtype="<f4")
        self._flat = self.vectors.view(np.uint8).reshape(-1)
        self.ids: list[bytes] = []
        self.n = 0
        self.buf = bytearray()
        self.header_done = False
        self.done = False
        self.on_rows = on_rows

    def _grow(self) -> None:
        new = np.empty((max(2 * len(self.vectors), 1024), self.dim), dtype="<f4")
        new[: self.n] = self.vectors[: self.n]
        self.vectors = new
        self._flat = new.view(np.uint8).reshape(-1)

    def feed(self, data: bytes | memoryview) -> None:
        self.buf += data
        buf = self.buf
        pos = 0
        if not self.header_done:
            if len(buf) < 19:
                return
            if bytes(buf[:11]) != _COPY_SIGNATURE:
                raise ValueError("not a binary COPY stream")
            pos = 19 + struct.unpack_from(">i", buf, 15)[0]
            self.header_done = True
        end = len(buf)
        vb = self.vec_bytes
        ids = self.ids
        start_n = self.n
        from_bytes = int.from_bytes
        # One tuple: int16 field count, int32 len + id bytes, int32 len + vector bytes.
        while pos + 2 <= end:
            if buf[pos] == 0xFF and buf[pos + 1] == 0xFF:  # trailer (-1)
                self.done = True
                pos += 2
                break
            if pos + 6 > end:
                break
            idlen = from_bytes(buf[pos + 2:pos + 6], "big")
            vpos = pos + 6 + idlen + 4
            if vpos + vb > end:
                break
            vlen = from_bytes(buf[vpos - 4:vpos], "big")
            if vlen != vb:
                raise ValueError(f"embedding of {bytes(buf[pos + 6:pos + 6 + idlen])!r} has {vlen} bytes, "
                                 f"expected {vb} (mixed dimensions in one model version?)")
            if self.n == len(self.vectors):
                self._grow()
            ids.append(bytes(buf[pos + 6:pos + 6 + idlen]))
            o = self.n * vb
            self._flat[o:o + vb] = np.frombuffer(buf, np.uint8, vb, vpos)
            self.n += 1
            pos = vpos + vb
        del buf[:pos]
        if self.on_rows is not None and self.n > start_n:
            self.on_rows(self.n - start_n)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Ids sorted bytewise and their vectors (one gather when rows came unsorted: the transient
        copy is no larger than the index built from them next)."""
        width = max((len(i) for i in self.ids), default=1)
        ids = np.array(self.ids, dtype=f"S{width}")
        self.ids = []
        vectors = self.vectors[: self.n]
        if len(ids) > 1 and not (ids[1:] >= ids[:-1]).all():
            order = np.argsort(ids, kind="stable")
            ids, vectors = ids[order], vectors[order]
        return ids, vectors


def read_embeddings(conn: psycopg.Connection, model_version: str, lo: str | None = None,
                    hi: str | None = None, *, created_after: str | None = None,
                    only_ids: list[str] | None = None, tag_filter: tuple[str, str] | None = None,
                    expected: int | None = None, progress=None) -> Embeddings:
    """Stream live embeddings of one model version (optionally an id range) into numpy.

    Runs in one REPEATABLE READ transaction so the rows and `read_at` come from one snapshot.
    `progress(n)` is called with the number of rows decoded per chunk.
    """
    fresh = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if fresh:  # otherwise we are inside the caller's transaction and share its snapshot
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        query, params = embeddings_query(model_version, lo, hi, created_after, only_ids, tag_filter)
        read_at = conn.execute("SELECT now()").fetchone()[0].isoformat()
        # one dimension per model version; the decoder checks every row against it
        dims = conn.execute("SELECT dim FROM embeddings WHERE model_version = %s LIMIT 1",
                            (model_version,)).fetchall()
        if not dims:
            return Embeddings(np.array([], dtype="S1"), np.empty((0, 0), np.float32), read_at)
        dim = dims[0][0]
        decoder = _CopyDecoder(dim, expected or 1024, on_rows=progress)
        copy_sql = sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(query)
        with conn.cursor() as cur:
            with cur.copy(copy_sql, params) as copy:
                for data in copy:
                    decoder.feed(data)
        ids, vectors = decoder.result()
    return Embeddings(ids, vectors, read_at)


# ---------------------------------------------------------------------------------------------
# writing

def encode_id_fields(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary COPY text fields (int32 length + bytes) of all ids, packed: (buffer, offsets, lengths)."""
    ids = np.asarray(ids)
    width = ids.dtype.itemsize
    raw = ids.view(np.uint8).reshape(len(ids), width)
    lengths = (raw != 0).sum(axis=1).astype(np.int64) if width else np.zeros(len(ids), np.int64)
    # ids never contain NUL (schema: [A-Za-z0-9._:-]), so the fixed-width padding is the trailing zeros
    fields = np.zeros((len(ids), 4 + width), np.uint8)
    fields[:, :4] = lengths.astype(">i4").view(np.uint8).reshape(-1, 4)
    fields[:, 4:] = raw
    field_len = 4 + lengths
    # drop the padding: keep bytes whose column < field length
    keep = np.arange(4 + width)[None, :] < field_len[:, None]
    buffer = fields[keep]
    offsets = np.zeros(len(ids), np.int64)
    np.cumsum(field_len[:-1], out=offsets[1:])
    return buffer, offsets, field_len


def _concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the concatenation of ranges [s, s+l) — a vectorised gather plan."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, np.int64)
    out_starts = np.cumsum(lengths) - lengths
    idx = np.arange(total, dtype=np.int64)
    idx += np.repeat(starts.astype(np.int64) - out_starts, lengths)
    return idx


def encode_rows(version: int, row_pos: np.ndarray, neigh_pos: np.ndarray, scores: np.ndarray,
                id_buffer: np.ndarray, id_offsets: np.ndarray, id_lengths: np.ndarray) -> bytes:
    """Binary COPY tuples (version, listing_id, neighbour_ids text[], scores real[]) for a chunk.

    `row_pos` are positions of the listings, `neigh_pos` (rows × k) positions of their neighbours
    (-1 = none; neighbours are packed to the left, best first). Ids come from `encode_id_fields`.
    """
    r, k = neigh_pos.shape
    valid = neigh_pos >= 0
    counts = valid.sum(axis=1).astype(np.int64)
    safe_neigh = np.where(valid, neigh_pos, 0)
    neigh_len = np.where(valid, id_lengths[safe_neigh], 0)

    # per-row fixed parts, built as small uint8 matrices
    head = np.zeros((r, 14), np.uint8)  # int16 nfields=4, int32 8, int64 version
    head[:, :6] = np.frombuffer(struct.pack(">hi", 4, 8), np.uint8)
    head[:, 6:14] = np.frombuffer(struct.pack(">q", version), np.uint8)

    # An array field: len, ndim, has-null, elem oid, then (dim, lower bound) when not empty;
    # an empty array is ndim 0 with no dimension words.
    nonempty = counts > 0
    arr = np.empty((r, 6), ">i4")
    arr[:, 0] = np.where(nonempty, 20 + neigh_len.sum(axis=1), 12)
    arr[:, 1:] = (1, 0, _TEXT_OID, 0, 1)
    arr[:, 1] = nonempty
    arr[:, 4] = counts
    arr_u8 = arr.view(np.uint8).reshape(r, 24)
    arr_len = np.where(nonempty, 24, 16)

    sc = np.empty((r, 6 + 2 * k), ">i4")
    sc[:, 0] = np.where(nonempty, 20 + 8 * counts, 12)
    sc[:, 1:6] = (1, 0, _FLOAT4_OID, 0, 1)
    sc[:, 1] = nonempty
    sc[:, 4] = counts
    sc[:, 6::2] = 4
    sc[:, 7::2] = np.asarray(scores, dtype=">f4").view(">i4")
    sc_u8 = sc.view(np.uint8).reshape(r, 4 * (6 + 2 * k))
    sc_len = np.where(nonempty, 24 + 8 * counts, 16)

    # one source buffer; each row is a list of segments (start, length) gathered in order
    parts = [id_buffer, head.reshape(-1), arr_u8.reshape(-1), sc_u8.reshape(-1)]
    base = np.cumsum([0] + [len(p) for p in parts[:-1]])
    source = np.concatenate(parts)
    rows = np.arange(r)
    seg_start = np.empty((r, k + 4), np.int64)
    seg_len = np.empty((r, k + 4), np.int64)
    seg_start[:, 0], seg_len[:, 0] = base[1] + rows * 14, 14
    seg_start[:, 1], seg_len[:, 1] = id_offsets[row_pos], id_lengths[row_pos]
    seg_start[:, 2], seg_len[:, 2] = base[2] + rows * 24, arr_len
    seg_start[:, 3:3 + k], seg_len[:, 3:3 + k] = id_offsets[safe_neigh], neigh_len
    seg_start[:, k + 3], seg_len[:, k + 3] = base[3] + rows * sc_u8.shape[1], sc_len
    return source[_concat_ranges(seg_start.reshape(-1), seg_len.reshape(-1))].tobytes()


def copy_neighbours(conn: psycopg.Connection, table: sql.Composable, chunks: Iterable[bytes]) -> None:
    """Binary COPY pre-encoded tuples into `table`; the caller owns the transaction."""
    stmt = sql.SQL("COPY {} (version, listing_id, neighbour_ids, scores) FROM STDIN (FORMAT binary)").format(table)
    with conn.cursor() as cur, cur.copy(stmt) as copy:
        copy.write(_COPY_HEADER)
        for chunk in chunks:
            copy.write(chunk)
        copy.write(_COPY_TRAILER)


def pack_left(positions: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move valid entries (position ≥ 0) to the left of each row, keeping their order."""
    invalid = positions < 0
    if not invalid.any():
        return positions, scores
    order = np.argsort(invalid, axis=1, kind="stable")
    return np.take_along_axis(positions, order, axis=1), np.take_along_axis(scores, order, axis=1)


def drop_self(positions: np.ndarray, scores: np.ndarray, self_pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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


# ---------------------------------------------------------------------------------------------
# versions

def stale_building(conn: psycopg.Connection, model_version: str) -> list[int]:
    rows = conn.execute(
        "SELECT version FROM similar_items_versions WHERE model_version = %s AND status = 'building'",
        (model_version,),
    ).fetchall()
    return [r[0] for r in rows]


def create_version(conn: psycopg.Connection, model_version: str, k: int, params: dict,
                   snapshot_at: str | None) -> int:
    """Insert a 'building' version row and commit it (the work below may take minutes)."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO similar_items_versions (model_version, status, k, params, snapshot_at)"
            " VALUES (%s, 'building', %s, %s, %s::timestamptz) RETURNING version",
            (model_version, k, json.dumps(params), snapshot_at),
        ).fetchone()
    return int(row[0])


def update_version_params(conn: psycopg.Connection, version: int, params: dict) -> None:
    with conn.transaction():
        conn.execute("UPDATE similar_items_versions SET params = params || %s::jsonb WHERE version = %s",
                     (json.dumps(params), version))


def mark_failed(conn: psycopg.Connection, versions: list[int], reason: str) -> None:
    """A version that will never be switched to: mark it failed and drop its rows.

    Only versions still 'building' are touched: an error after the switch (say, while pruning) must not
    empty the shelves that now serve.
    """
    if not versions:
        return
    with conn.transaction():
        conn.execute("DELETE FROM similar_items WHERE version IN (SELECT version FROM similar_items_versions"
                     " WHERE version = ANY(%s) AND status = 'building')", (versions,))
        conn.execute(
            "UPDATE similar_items_versions SET status = 'failed', finished_at = now(),"
            " params = params || jsonb_build_object('error', %s::text)"
            " WHERE version = ANY(%s) AND status = 'building'",
            (reason, versions),
        )
    log.warning("similar-items versions %s marked failed: %s", versions, reason)


def version_row_count(conn: psycopg.Connection, version: int) -> int:
    return int(conn.execute("SELECT count(*) FROM similar_items WHERE version = %s", (version,)).fetchone()[0])


def switch_active(conn: psycopg.Connection, version: int) -> int | None:
    """Make `version` the one readers see, in one transaction. Returns the version it replaced."""
    with conn.transaction():
        row = conn.execute(
            "SELECT model_version, status FROM similar_items_versions WHERE version = %s FOR UPDATE", (version,)
        ).fetchone()
        if row is None or row[1] != "building":
            raise RuntimeError(f"similar-items version {version} is not building (status {row and row[1]})")
        model_version = row[0]
        # lock the active row so two switches of one model version serialise
        old = conn.execute(
            "SELECT version FROM similar_items_active WHERE model_version = %s FOR UPDATE", (model_version,)
        ).fetchone()
        conn.execute("UPDATE similar_items_versions SET status = 'ready', finished_at = now() WHERE version = %s",
                     (version,))
        conn.execute(
            "INSERT INTO similar_items_active (model_version, version) VALUES (%s, %s)"
            " ON CONFLICT (model_version) DO UPDATE SET version = EXCLUDED.version, switched_at = now()",
            (model_version, version),
        )
        conn.execute(
            "UPDATE similar_items_versions SET status = 'retired'"
            " WHERE model_version = %s AND status = 'ready' AND version <> %s",
            (model_version, version),
        )
        # online rows computed before this version's data was read are superseded by it (the view
        # already ignores them; this is cleanup). SKIP LOCKED: a row a worker is rewriting right now
        # will be newer than the snapshot, and waiting for it could deadlock the switch with that worker
        conn.execute(
            "DELETE FROM similar_items_online d WHERE (d.model_version, d.listing_id) IN ("
            " SELECT o.model_version, o.listing_id FROM similar_items_online o"
            " JOIN similar_items_versions v ON v.version = %s AND o.model_version = v.model_version"
            " JOIN similar_items s ON s.version = v.version AND s.listing_id = o.listing_id"
            " WHERE o.computed_at <= v.snapshot_at FOR UPDATE OF o SKIP LOCKED)",
            (version,),
        )
    return old[0] if old else None


def prune_versions(conn: psycopg.Connection, model_version: str, keep_retired: int = 1) -> list[int]:
    """Delete retired versions beyond the newest `keep_retired` (kept for a quick rollback)."""
    rows = conn.execute(
        "SELECT version, status FROM similar_items_versions WHERE model_version = %s"
        " AND status IN ('retired', 'failed') ORDER BY version DESC",
        (model_version,),
    ).fetchall()
    doomed = [v for v, s in rows if s == "retired"][keep_retired:]
    failed = [v for v, s in rows if s == "failed"]
    with conn.transaction():
        # failed versions keep their row (with the error) as history; their neighbours go
        conn.execute("DELETE FROM similar_items WHERE version = ANY(%s)", (doomed + failed,))
        conn.execute("DELETE FROM similar_items_versions WHERE version = ANY(%s)", (doomed,))
    return doomed


def kept_model_versions(conn: psycopg.Connection, keep: int) -> set[str]:
    """Model versions whose embeddings, online rows and shelves are kept: the last `keep` that were
    active (the active one first), and the model whose shelves serve now, whatever its age."""
    rows = conn.execute(
        "SELECT model_version FROM models WHERE status = 'active' OR was_active"
        " ORDER BY (status = 'active') DESC, promoted_at DESC NULLS LAST, model_version LIMIT %s", (keep,),
    ).fetchall()
    kept = {r[0] for r in rows}
    shelf = conn.execute(SHELF_MODEL_SQL).fetchone()
    if shelf is not None:
        kept.add(shelf[0])
    return kept


def prunable_model_versions(conn: psycopg.Connection, keep: int) -> list[str]:
    """Models that were active, are not kept (`kept_model_versions`) and still hold rows, oldest first.

    Only models that were once active are ever pruned: candidates, shadows and versions the registry does
    not know (ENRICH_MODEL_DIR, hand-run reindexes) keep their rows.
    """
    rows = conn.execute(
        "SELECT m.model_version FROM models m WHERE m.was_active AND m.status <> 'active'"
        " AND (EXISTS (SELECT 1 FROM embeddings e WHERE e.model_version = m.model_version)"
        "   OR EXISTS (SELECT 1 FROM similar_items_versions v WHERE v.model_version = m.model_version)"
        "   OR EXISTS (SELECT 1 FROM similar_items_online o WHERE o.model_version = m.model_version))"
        " ORDER BY m.promoted_at NULLS FIRST, m.model_version",
    ).fetchall()
    kept = kept_model_versions(conn, keep)
    return [r[0] for r in rows if r[0] not in kept]


def prune_model_version(conn: psycopg.Connection, model_version: str, keep: int) -> bool:
    """Delete one old model's embeddings, online rows and similar-items versions in one transaction.

    The model's registry row is locked and the rule checked again inside it, so a rollback to this
    version that commits first keeps its rows (and one that comes after finds them gone and needs a
    backfill). Returns False when the version turned out to be kept.
    """
    with conn.transaction():
        row = conn.execute("SELECT status FROM models WHERE model_version = %s FOR UPDATE",
                           (model_version,)).fetchone()
        if row is None or row[0] == "active" or model_version in kept_model_versions(conn, keep):
            return False
        conn.execute("DELETE FROM similar_items_active WHERE model_version = %s", (model_version,))
        # similar_items rows go with their versions (ON DELETE CASCADE)
        conn.execute("DELETE FROM similar_items_versions WHERE model_version = %s", (model_version,))
        conn.execute("DELETE FROM similar_items_online WHERE model_version = %s", (model_version,))
        n = conn.execute("DELETE FROM embeddings WHERE model_version = %s", (model_version,)).rowcount
    log.info("pruned model %s: %d embeddings, its online rows and similar-items versions", model_version, n)
    return True


def active_version(conn: psycopg.Connection, model_version: str) -> int | None:
    row = conn.execute("SELECT version FROM similar_items_active WHERE model_version = %s",
                       (model_version,)).fetchone()
    return row[0] if row else None


def iter_id_chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
