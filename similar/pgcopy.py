"""PostgreSQL's binary COPY format for similar items, encoded and decoded with numpy.

The format (PostgreSQL docs, COPY, "Binary Format"): an 11-byte signature, an int32 of flags and an int32
header-extension length; then per tuple an int16 field count and per field an int32 length and that many
bytes; an int16 -1 ends the stream. Integers are big-endian.

Out (`copy_vectors_out`): `COPY (SELECT vector, listing_id ...) TO STDOUT (FORMAT binary)`. Postgres sends one
message per row; a few thousand messages at a time are decoded as one uint8 matrix into a preallocated float32
array (little-endian bytes straight into numpy), with no per-row Python work beyond collecting the messages
(`VectorRowDecoder`).

In (`copy_neighbours_in`): similar_items tuples (version, listing_id, neighbour_ids text[], scores real[]) are
built for whole chunks of rows with numpy (`encode_id_fields`, `encode_neighbour_rows`) rather than by a
`write_row` call per row.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import psycopg
from psycopg import sql

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
HEADER = SIGNATURE + struct.pack(">ii", 0, 0)  # no flags, no header extension
TRAILER = struct.pack(">h", -1)
TEXT_OID = 25
FLOAT4_OID = 700

ENCODE_CHUNK = 16_384  # similar_items rows encoded into one bytes object
READ_BATCH = 4096      # COPY messages (rows) decoded at a time
SINK_ROWS = 65_536     # rows per chunk a streaming read hands over

Buffer = bytes | bytearray | memoryview


# ---------------------------------------------------------------------------------------------
# out: (vector bytea, listing_id text) rows → numpy

class VectorRowDecoder:
    """Decodes binary COPY rows of (vector bytea of 4·dim little-endian float32 bytes, listing_id text).

    Postgres sends one COPY message per row, so a batch of messages is padded to its longest row
    and decoded as one uint8 matrix: the vector sits at the same offset in every row (it comes
    first) and the id, NUL-padded, ends each row, so no Python code runs per row beyond collecting
    the messages. Messages that do not frame whole rows fall back to a row-by-row parse of the bytes.
    """

    def __init__(self, dim: int, capacity: int, on_rows: Callable[[int], object] | None = None) -> None:
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

    def feed(self, messages: Sequence[Buffer]) -> None:
        """Decode a batch of COPY messages, in stream order."""
        if not messages:
            return
        start_n = self.n
        if not self.header_done:
            first = bytes(messages[0])
            if len(first) < 19 or first[:11] != SIGNATURE:
                raise ValueError("not a binary COPY stream")
            skip = 19 + struct.unpack_from(">i", first, 15)[0]
            messages = [memoryview(first)[skip:], *messages[1:]]
            self.header_done = True
        if self.carry or not self._feed_framed(messages):
            self.carry += b"".join(messages)
            self._parse_carry()
        if self.on_rows is not None and self.n > start_n:
            self.on_rows(self.n - start_n)

    def _feed_framed(self, messages: Sequence[Buffer]) -> bool:
        """The fast path: every message is one whole row (or the trailer). False: nothing consumed."""
        lengths = [len(m) for m in messages]
        if lengths[0] == 0:  # the header came alone
            messages, lengths = messages[1:], lengths[1:]
        trailer = bool(lengths) and lengths[-1] == 2 and bytes(messages[-1]) == TRAILER
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
                parts: list[Buffer] = []
                for m, n in zip(messages, lengths, strict=True):
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
        """Every row, in arrival order: the ids and a view of the vectors (no copy)."""
        self.check_complete()
        ids = concat_ids(self.id_parts)
        self.id_parts = []
        return ids, self.vectors[: self.n]

    def check_complete(self) -> None:
        if self.carry:
            raise ValueError(f"binary COPY stream ended inside a row ({len(self.carry)} bytes left)")


def concat_ids(parts: list[np.ndarray]) -> np.ndarray:
    """Fixed-width byte-string arrays joined at the widest width."""
    width = max((p.dtype.itemsize for p in parts), default=1)
    return np.concatenate([p.astype(f"S{width}") for p in parts]) if parts else np.array([], dtype="S1")


def copy_vectors_out(conn: psycopg.Connection, query: sql.Composable, params: Sequence[object], dim: int, *,
                     capacity: int = 1024, progress: Callable[[int], object] | None = None,
                     sink: Callable[[np.ndarray, np.ndarray], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (listing_id, vector) rows of `query` as (ids, vectors), in arrival order, through one binary COPY.

    Every vector must have `dim` float32s. `capacity`: rows to allocate for up front (grown as needed).
    `progress(n)` is called with the number of rows decoded per batch. With `sink`, rows are handed to
    `sink(ids, vectors)` in chunks of about SINK_ROWS as they arrive and not kept: the result holds all
    the ids handed over and no vectors.
    """
    decoder = VectorRowDecoder(dim, SINK_ROWS if sink is not None else capacity, on_rows=progress)
    streamed: list[np.ndarray] = []

    def hand_over(to: Callable[[np.ndarray, np.ndarray], None]) -> None:
        ids, vectors = decoder.take()
        if len(ids):
            streamed.append(ids)
            to(ids, vectors)

    # the vector first: at the same offset in every row, whatever the id's length
    copy_sql = sql.SQL("COPY (SELECT q.vector, q.listing_id FROM ({}) q) TO STDOUT (FORMAT binary)").format(query)
    with conn.cursor() as cur, cur.copy(copy_sql, params) as copy:
        batch: list[Buffer] = []
        for data in copy:
            batch.append(data)
            if len(batch) == READ_BATCH:
                decoder.feed(batch)
                batch = []
                if sink is not None and decoder.n >= SINK_ROWS:
                    hand_over(sink)
        decoder.feed(batch)
    if sink is None:
        return decoder.result()
    decoder.check_complete()
    hand_over(sink)
    return concat_ids(streamed), np.empty((0, dim), np.float32)


# ---------------------------------------------------------------------------------------------
# in: similar_items rows from numpy

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


def encode_neighbour_rows(version: int, row_pos: np.ndarray, neigh_pos: np.ndarray, scores: np.ndarray,
                          ids: IdFields) -> bytes:
    """Binary COPY tuples (version, listing_id, neighbour_ids text[], scores real[]) for a chunk of rows.

    `row_pos` are positions of the listings in `ids` (from `encode_id_fields`), `neigh_pos` (rows × k)
    positions of their neighbours (-1 = none; neighbours are packed to the left, best first). Each row
    is laid out at its widest (every id field padded, k neighbours) in one uint8 matrix; unless every
    field is full, a mask then drops the padding.
    """
    id_fields, id_lengths = ids.fields, ids.lengths
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
    arr[:, 1:] = (1, 0, TEXT_OID, 0, 1)
    arr[:, 1] = nonempty
    arr[:, 4] = counts
    out[:, c_arr:c_nb] = arr.view(np.uint8).reshape(r, 24)
    out[:, c_nb:c_sc] = id_fields[safe_neigh].reshape(r, k * width)

    sc = np.empty((r, 6 + 2 * k), ">i4")
    sc[:, 0] = np.where(nonempty, 20 + 8 * counts, 12)
    sc[:, 1:6] = (1, 0, FLOAT4_OID, 0, 1)
    sc[:, 1] = nonempty
    sc[:, 4] = counts
    sc[:, 6::2] = 4
    sc[:, 7::2] = np.asarray(scores, dtype=">f4").view(">i4")
    out[:, c_sc:] = sc.view(np.uint8).reshape(r, 24 + 8 * k)
    if ids.uniform and valid.all() and nonempty.all():
        return out.tobytes()

    keep = np.ones((r, row_bytes), bool)
    cols = np.arange(width)
    keep[:, c_id:c_arr] = cols < id_lengths[row_pos][:, None]
    keep[:, c_arr + 16:c_nb] = nonempty[:, None]
    keep[:, c_nb:c_sc] = (cols < neigh_len[:, :, None]).reshape(r, k * width)
    keep[:, c_sc + 16:c_sc + 24] = nonempty[:, None]
    keep[:, c_sc + 24:] = np.repeat(valid, 8, axis=1)
    return out[keep].tobytes()


def copy_neighbours_in(conn: psycopg.Connection, table: str, chunks: Iterable[bytes]) -> None:
    """Binary COPY tuples from `encode_neighbour_rows` into `table`; the caller owns the transaction."""
    stmt = sql.SQL("COPY {} (version, listing_id, neighbour_ids, scores) FROM STDIN (FORMAT binary)").format(
        sql.Identifier(table))
    with conn.cursor() as cur, cur.copy(stmt) as copy:
        copy.write(HEADER)
        for chunk in chunks:
            copy.write(chunk)
        copy.write(TRAILER)
