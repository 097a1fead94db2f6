"""PNG contact sheet for `enrich similar --png`: the query listing, then its neighbours with scores.

Images come from the first image URI of each listing's event when it is a readable local file
(decoded with the worker's guards: size and pixel limits, allowed formats). Anything else — S3,
HTTP, a missing or hostile file — gets a grey "no image" tile instead; the sheet is still written.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from PIL import Image, ImageDraw, ImageOps

from core.images import ImageError, ImageLimits, decode_image
from core.rows import fetch_value
from similar.common import Neighbour

log = logging.getLogger(__name__)
TILE = 160
LABEL = 34


def _local_image(uri: str, limits: ImageLimits) -> Image.Image | None:
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in ("", "file"):
        return None
    path = Path(urlsplit(uri).path if scheme == "file" else uri)
    try:
        if not path.is_file() or path.stat().st_size > limits.max_bytes:
            return None
        data = path.read_bytes()
        return decode_image(data, limits, TILE, uri)
    except (OSError, ImageError) as exc:
        log.info("contact sheet: no image for %s (%s)", uri, exc)
        return None


def _first_image_uri(conn: psycopg.Connection, listing_id: str) -> str | None:
    return fetch_value(conn, "SELECT event->'images'->>0 FROM listings WHERE listing_id = %s", (listing_id,))


def contact_sheet(conn: psycopg.Connection, listing_id: str, neighbours: Sequence[Neighbour], out: Path, *,
                  limits: ImageLimits, columns: int = 6) -> int:
    """Write the sheet; returns how many tiles had a real image. `limits`: ImageLimits.from_settings(settings)."""
    items: list[tuple[str, float | None]] = [(listing_id, None)] + [(n.listing_id, n.score) for n in neighbours]
    rows = (len(items) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    shown = 0
    for i, (lid, score) in enumerate(items):
        x, y = (i % columns) * TILE, (i // columns) * (TILE + LABEL)
        uri = _first_image_uri(conn, lid)
        img = _local_image(uri, limits) if uri else None
        if img is None:
            draw.rectangle([x + 4, y + 4, x + TILE - 4, y + TILE - 4], fill=(200, 200, 200))
            draw.text((x + 12, y + TILE // 2 - 6), "no image", fill=(90, 90, 90))
        else:
            img = ImageOps.contain(img, (TILE - 8, TILE - 8))  # up as well as down: 28–64 px photos fill the tile
            sheet.paste(img, (x + (TILE - img.width) // 2, y + (TILE - img.height) // 2))
            shown += 1
        caption = "query" if score is None else f"{score:.3f}"
        draw.text((x + 4, y + TILE + 2), lid[:24], fill=(0, 0, 0))
        draw.text((x + 4, y + TILE + 16), caption, fill=(180, 0, 0) if score is None else (0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return shown
