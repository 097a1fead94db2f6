"""The binary COPY decoder of embeddings: however the stream is cut into messages, the same rows come out."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from similar import pgcopy


def _stream(ids: list[bytes], vectors: np.ndarray) -> tuple[bytes, list[bytes], bytes]:
    """(header, one message per row, trailer) as `COPY (SELECT vector, listing_id) TO STDOUT (FORMAT binary)`."""
    header = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
    rows = []
    for lid, vec in zip(ids, vectors, strict=True):
        raw = np.asarray(vec, dtype="<f4").tobytes()
        rows.append(struct.pack(">hi", 2, len(raw)) + raw + struct.pack(">i", len(lid)) + lid)
    return header, rows, struct.pack(">h", -1)


def _decode(messages: list[bytes], dim: int, batch: int = 7) -> tuple[np.ndarray, np.ndarray]:
    decoder = pgcopy.VectorRowDecoder(dim, capacity=3)  # grows past 3
    for i in range(0, len(messages), batch):
        decoder.feed(messages[i:i + batch])
    assert decoder.done
    return decoder.result()


@pytest.mark.parametrize("framing", ["one row per message", "header alone", "cut anywhere"])
def test_rows_decode_alike_whatever_the_framing(framing):
    rng = np.random.default_rng(3)
    ids = [f"{'x' * int(rng.integers(1, 30))}-{i}".encode() for i in range(50)]
    vectors = rng.normal(size=(50, 6)).astype(np.float32)
    header, rows, trailer = _stream(ids, vectors)
    if framing == "one row per message":  # what Postgres sends: the header comes with the first row
        messages = [header + rows[0], *rows[1:], trailer]
    elif framing == "header alone":
        messages = [header, *rows, trailer]
    else:
        blob = header + b"".join(rows) + trailer
        cuts = sorted(set(rng.integers(1, len(blob), 40).tolist()))
        messages = [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=True)]
    got_ids, got_vectors = _decode(messages, dim=6)
    assert list(got_ids) == ids  # in stream order
    np.testing.assert_array_equal(got_vectors, vectors)


def test_a_vector_of_another_dimension_is_refused():
    header, rows, trailer = _stream([b"a", b"b"], np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="expected 24 bytes|mixed dimensions"):
        _decode([header + rows[0], rows[1], trailer], dim=6)

