"""Postgres side of similar items: stream embeddings out, COPY neighbours in, switch versions.

Reads use one binary `COPY (SELECT ...) TO STDOUT`: rows arrive one message each and are decoded a
few thousand at a time as one uint8 matrix into a preallocated float32 array (little-endian bytes
straight into numpy); no per-row Python work beyond collecting the messages. Writes build
PostgreSQL's binary COPY format for whole chunks of rows with numpy (`encode_rows`) rather than
calling `write_row` per row.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

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
    read_snapshot: str | None = None  # its pg_snapshot: exactly what it saw (`not_visible_in` reads the rest)

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------------------------
# reading

def _live_filter(alias: str = "l") -> sql.Composable:
    # a listing the seller deleted or sold has status 'deleted' (ListingEvent.deleted)
    return sql.SQL("{}.status <> 'deleted'").format(sql.Identifier(alias))


def embeddings_query(model_version: str, lo: str | None = None, hi: str | None = None,
                     created_after: str | None = None, only_ids: list[str] | None = None,
                     tag_filter: tuple[str, str] | None = None,
                     not_visible_in: str | None = None) -> tuple[sql.Composable, list]:
    """SELECT listing_id, vector of live listings for one model version (in no particular order:
    sorting 1 GB of vectors in Postgres costs more than sorting the ids in numpy).

    `not_visible_in` (a pg_snapshot, as text): only rows written by transactions that snapshot did not see.
    """
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
    if not_visible_in is not None:
        # the range is what the index finds; the visibility test drops the few rows in it the snapshot saw
        where.append(sql.SQL("e.written_xid >= pg_snapshot_xmin(%s::pg_snapshot)"
                             " AND NOT pg_visible_in_snapshot(e.written_xid, %s::pg_snapshot)"))
        params += [not_visible_in, not_visible_in]
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
    count = conn.execute(sql.SQL("SELECT count(*) FROM ({}) q").format(query), params).fetchone()[0]
    # one dimension per model version (the reader checks every row against it): no pass over the vectors
    dim = conn.execute("SELECT dim FROM embeddings WHERE model_version = %s LIMIT 1", (model_version,)).fetchone()
    return int(count), (int(dim[0]) if count and dim else None)


class _CopyDecoder:
    """Decoder of binary COPY rows (vector bytea of 4·dim bytes, listing_id text) into numpy.

    Postgres sends one COPY message per row, so a batch of messages is padded to its longest row
    and decoded as one uint8 matrix: the vector sits at the same offset in every row (it comes
    first) and the id, NUL-padded, ends each row, so no Python code runs per row beyond collecting
    the messages. Messages that do not frame whole rows fall back to a row-by-row parse of the bytes.
    """

    def __init__(self, dim: int, capacity: int, on_rows=None):
        self.dim = dim
        self.vec_bytes = 4 * dim
        self.vectors = np.empty((max(capacity, 1), dim), dtype="<f4")
        self.id_parts: list[np.ndarray] = []
        self.n = 0
        self.carry = bytearray()  # bytes of rows not framed one per message (the slow path)
        self.header_done = False
        self.done = False
        self.on_rows = on_rows
        self._pads: dict[int, bytes] = {}

    def _room(self, rows: int) -> np.ndarray:
        """The uint8 view of vectors[n:n + rows], growing the array first when needed."""
        if self.n + rows > len(self.vectors):
            new = np.empty((max(2 * len(self.vectors), self.n + rows, 1024), self.dim), dtype="<f4")
            new[: self.n] = self.vectors[: self.n]
            self.vectors = new
        return self.vectors[self.n:self.n + rows].view(np.uint8)

    def feed(self, messages: list) -> None:
        """Decode a batch of COPY messages (bytes-like), in stream order."""
        if not messages:
            return
        start_n = self.n
        if not self.header_done:
            first = bytes(messages[0])
            if len(first) < 19 or first[:11] != _COPY_SIGNATURE:
                raise ValueError("not a binary COPY stream")
            skip = 19 + struct.unpack_from(">i", first, 15)[0]
            messages = [memoryview(first)[skip:], *messages[1:]]
            self.header_done = True
        if self.carry or not self._feed_framed(messages):
            self.carry += b"".join(messages)
            self._parse_carry()
        if self.on_rows is not None and self.n > start_n:
            self.on_rows(self.n - start_n)

    def _feed_framed(self, messages: list) -> bool:
        """The fast path: every message is one whole row (or the trailer). False: nothing consumed."""
        lengths = [len(m) for m in messages]
        if lengths[0] == 0:  # the header came alone
            messages, lengths = messages[1:], lengths[1:]
        trailer = bool(lengths) and lengths[-1] == 2 and bytes(messages[-1]) == _COPY_TRAILER
        if trailer:
            messages, lengths = messages[:-1], lengths[:-1]
        if messages:
            vb = self.vec_bytes
            fixed = 2 + 4 + vb + 4  # field count, vector length + bytes, id length
            widest = max(lengths)
            if min(lengths) <= fixed:
                return False
            if widest == min(lengths):
                blob = b"".join(messages)
            else:  # pad every row to the widest with NULs: the id field then ends in NUL padding
                pads = self._pads
                parts = []
                for m, n in zip(messages, lengths):
                    parts.append(m)
                    if n < widest:
                        pad = pads.get(widest - n)
                        if pad is None:
                            pad = pads[widest - n] = bytes(widest - n)
                        parts.append(pad)
                blob = b"".join(parts)
            rows = np.frombuffer(blob, np.uint8).reshape(len(messages), widest)
            nfields = rows[:, 0:2].view(">i2")[:, 0]
            vlen = rows[:, 2:6].view(">i4")[:, 0]
            idlen = np.ascontiguousarray(rows[:, 6 + vb:fixed]).view(">i4")[:, 0]
            if not ((nfields == 2).all() and (vlen == vb).all()
                    and (idlen == np.asarray(lengths) - fixed).all()):
                return False
            self._room(len(rows))[:] = rows[:, 6:6 + vb]
            self.id_parts.append(np.ascontiguousarray(rows[:, fixed:]).view(f"S{widest - fixed}")[:, 0])
            self.n += len(rows)
        self.done = self.done or trailer
        return True

    def _parse_carry(self) -> None:
        buf = self.carry
        pos, end, vb = 0, len(buf), self.vec_bytes
        ids = []
        while pos + 2 <= end:
            if buf[pos] == 0xFF and buf[pos + 1] == 0xFF:  # trailer (-1)
                self.done = True
                pos += 2
                break
            if pos + 6 > end:
                break
            vlen = int.from_bytes(buf[pos + 2:pos + 6], "big")
            if vlen != vb:
                raise ValueError(f"embedding with {vlen} bytes, expected {vb} "
                                 f"(mixed dimensions in one model version?)")
            ipos = pos + 6 + vb + 4
            if ipos > end:
                break
            idlen = int.from_bytes(buf[ipos - 4:ipos], "big")
            if ipos + idlen > end:
                break
            self._room(1)[0] = np.frombuffer(buf, np.uint8, vb, pos + 6)
            ids.append(bytes(buf[ipos:ipos + idlen]))
            self.n += 1
            pos = ipos + idlen
        if ids:
            self.id_parts.append(np.array(ids, dtype=f"S{max(map(len, ids))}"))
        del buf[:pos]

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows decoded so far, in arrival order, forgetting them (a streaming reader's chunk)."""
        ids = concat_ids(self.id_parts)
        vectors = self.vectors[: self.n].copy()
        self.id_parts, self.n = [], 0
        return ids, vectors

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Ids sorted bytewise and their vectors (one gather when rows came unsorted: the transient
        copy is no larger than the index built from them next)."""
        if self.carry:
            raise ValueError(f"binary COPY stream ended inside a row ({len(self.carry)} bytes left)")
        ids = concat_ids(self.id_parts)
        self.id_parts = []
        vectors = self.vectors[: self.n]
        if len(ids) > 1 and not (ids[1:] >= ids[:-1]).all():
            order = bytewise_order(ids)
            ids, vectors = ids[order], vectors[order]
        return ids, vectors


def concat_ids(parts: list[np.ndarray]) -> np.ndarray:
    """Fixed-width byte-string arrays joined at the widest width."""
    width = max((p.dtype.itemsize for p in parts), default=1)
    return np.concatenate([p.astype(f"S{width}") for p in parts]) if parts else np.array([], dtype="S1")


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


_READ_BATCH = 4096  # COPY messages (rows) decoded at a time
SINK_ROWS = 65_536  # rows per chunk a streaming read hands over


def read_embeddings(conn: psycopg.Connection, model_version: str, lo: str | None = None,
                    hi: str | None = None, *, created_after: str | None = None,
                    only_ids: list[str] | None = None, tag_filter: tuple[str, str] | None = None,
                    not_visible_in: str | None = None, expected: int | None = None, progress=None,
                    sink: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Embeddings:
    """Stream live embeddings of one model version (optionally an id range) into numpy.

    With `sink`, rows are handed to `sink(ids, vectors)` in chunks of about SINK_ROWS as they arrive and
    not kept: the result holds the ids only, in arrival order (not sorted), and no vectors.

    Runs in one REPEATABLE READ transaction so the rows, `read_at` and `read_snapshot` come from one snapshot.
    `progress(n)` is called with the number of rows decoded per batch.
    """
    fresh = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if fresh:  # otherwise we are inside the caller's transaction and share its snapshot
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        # one backend streams the rows: parallel workers would only pass every row through a queue
        # to it and take CPU from the decoding client
        conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        query, params = embeddings_query(model_version, lo, hi, created_after, only_ids, tag_filter, not_visible_in)
        now, snapshot = conn.execute("SELECT now(), pg_current_snapshot()::text").fetchone()
        read_at = now.isoformat()
        # one dimension per model version; the decoder checks every row against it
        dims = conn.execute("SELECT dim FROM embeddings WHERE model_version = %s LIMIT 1",
                            (model_version,)).fetchall()
        if not dims:
            return Embeddings(np.array([], dtype="S1"), np.empty((0, 0), np.float32), read_at, snapshot)
        dim = dims[0][0]
        decoder = _CopyDecoder(dim, SINK_ROWS if sink else (expected or 1024), on_rows=progress)
        streamed: list[np.ndarray] = []

        def hand_over() -> None:
            ids, vectors = decoder.take()
            if len(ids):
                streamed.append(ids)
                sink(ids, vectors)

        # the vector first: at the same offset in every row, whatever the id's length
        copy_sql = sql.SQL("COPY (SELECT q.vector, q.listing_id FROM ({}) q) TO STDOUT (FORMAT binary)").format(query)
        with conn.cursor() as cur:
            with cur.copy(copy_sql, params) as copy:
                batch = []
                for data in copy:
                    batch.append(data)
                    if len(batch) == _READ_BATCH:
                        decoder.feed(batch)
                        batch = []
                        if sink is not None and decoder.n >= SINK_ROWS:
                            hand_over()
                decoder.feed(batch)
        if sink is None:
            ids, vectors = decoder.result()
            return Embeddings(ids, vectors, read_at, snapshot)
        if decoder.carry:
            raise ValueError(f"binary COPY stream ended inside a row ({len(decoder.carry)} bytes left)")
        hand_over()
    return Embeddings(concat_ids(streamed), np.empty((0, dim), np.float32), read_at, snapshot)


def sample_embeddings(conn: psycopg.Connection, model_version: str, rows: int, total: int,
                      seed: int = 1234) -> np.ndarray:
    """About `rows` vectors of the model version from random table pages (TABLESAMPLE SYSTEM): a training
    sample for k-means without a pass over the whole table. Deleted listings may be in it (harmless)."""
    percent = min(100.0, 100.0 * 1.2 * rows / max(total, 1))
    got = conn.execute("SELECT vector FROM embeddings TABLESAMPLE SYSTEM (%s) REPEATABLE (%s)"
                       " WHERE model_version = %s LIMIT %s", (percent, seed, model_version, rows)).fetchall()
    if not got:
        return np.empty((0, 0), np.float32)
    return np.frombuffer(b"".join(r[0] for r in got), "<f4").reshape(len(got), -1)


# ---------------------------------------------------------------------------------------------
# writing

class IdFields(NamedTuple):
    """Binary COPY text fields of ids, one row each: int32 length + bytes, NUL-padded to one width."""

    fields: np.ndarray   # (n, 4 + width) uint8
    lengths: np.ndarray  # (n,) int64: 4 + the id's length, the bytes a field really takes
    uniform: bool        # every id has the widest length: no padding to drop


def encode_id_fields(ids: np.ndarray) -> IdFields:
    """The binary COPY text field of every id (row i for ids[i]); see `IdFields`."""
    ids = np.asarray(ids)
    n, width = len(ids), ids.dtype.itemsize
    raw = ids.view(np.uint8).reshape(n, width)
    # ids never contain NUL (schema: [A-Za-z0-9._:-]), so the fixed-width padding is the trailing zeros
    lengths = (raw != 0).sum(axis=1).astype(np.int64) if width else np.zeros(n, np.int64)
    width = int(lengths.max()) if n else 0
    fields = np.zeros((n, 4 + width), np.uint8)
    fields[:, :4] = lengths.astype(">i4").view(np.uint8).reshape(-1, 4)
    fields[:, 4:] = raw[:, :width]
    return IdFields(fields, 4 + lengths, bool((lengths == width).all()))


def encode_rows(version: int, row_pos: np.ndarray, neigh_pos: np.ndarray, scores: np.ndarray,
                id_fields: np.ndarray, id_lengths: np.ndarray, uniform: bool) -> bytes:
    """Binary COPY tuples (version, listing_id, neighbour_ids text[], scores real[]) for a chunk.

    `row_pos` are positions of the listings, `neigh_pos` (rows × k) positions of their neighbours
    (-1 = none; neighbours are packed to the left, best first). The id arguments are the three
    parts of `encode_id_fields`. Each row is laid out at its widest (every id field padded, k
    neighbours) in one uint8 matrix; unless every field is full, a mask then drops the padding.
    """
    r, k = neigh_pos.shape
    width = id_fields.shape[1]
    valid = neigh_pos >= 0
    counts = valid.sum(axis=1).astype(np.int64)
    nonempty = counts > 0
    safe_neigh = np.where(valid, neigh_pos, 0)
    neigh_len = np.where(valid, id_lengths[safe_neigh], 0)

    # column offsets: head | listing id | ids array header | k ids | scores array header | k scores
    c_id = 14
    c_arr = c_id + width
    c_nb = c_arr + 24
    c_sc = c_nb + k * width
    row_bytes = c_sc + 24 + 8 * k
    out = np.empty((r, row_bytes), np.uint8)
    out[:, :6] = np.frombuffer(struct.pack(">hi", 4, 8), np.uint8)  # 4 fields; int64 version
    out[:, 6:14] = np.frombuffer(struct.pack(">q", version), np.uint8)
    out[:, c_id:c_arr] = id_fields[row_pos]

    # An array field: len, ndim, has-null, elem oid, then (dim, lower bound) when not empty;
    # an empty array is ndim 0 with no dimension words.
    arr = np.empty((r, 6), ">i4")
    arr[:, 0] = np.where(nonempty, 20 + neigh_len.sum(axis=1), 12)
    arr[:, 1:] = (1, 0, _TEXT_OID, 0, 1)
    arr[:, 1] = nonempty
    arr[:, 4] = counts
    out[:, c_arr:c_nb] = arr.view(np.uint8).reshape(r, 24)
    out[:, c_nb:c_sc] = id_fields[safe_neigh].reshape(r, k * width)

    sc = np.empty((r, 6 + 2 * k), ">i4")
    sc[:, 0] = np.where(nonempty, 20 + 8 * counts, 12)
    sc[:, 1:6] = (1, 0, _FLOAT4_OID, 0, 1)
    sc[:, 1] = nonempty
    sc[:, 4] = counts
    sc[:, 6::2] = 4
    sc[:, 7::2] = np.asarray(scores, dtype=">f4").view(">i4")
    out[:, c_sc:] = sc.view(np.uint8).reshape(r, 24 + 8 * k)
    if uniform and valid.all() and nonempty.all():
        return out.tobytes()

    keep = np.ones((r, row_bytes), bool)
    cols = np.arange(width)
    keep[:, c_id:c_arr] = cols < id_lengths[row_pos][:, None]
    keep[:, c_arr + 16:c_nb] = nonempty[:, None]
    keep[:, c_nb:c_sc] = (cols < neigh_len[:, :, None]).reshape(r, k * width)
    keep[:, c_sc + 16:c_sc + 24] = nonempty[:, None]
    keep[:, c_sc + 24:] = np.repeat(valid, 8, axis=1)
    return out[keep].tobytes()


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
