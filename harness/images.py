"""Small real images made with Pillow, as encoded bytes."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(colour=(200, 30, 30), size=(40, 48), mode="RGB") -> bytes:
    """A PNG of one colour."""
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size=(64, 48), seed=0) -> bytes:
    """A JPEG of random pixels (the same for the same seed)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()
