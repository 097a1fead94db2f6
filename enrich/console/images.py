"""Thumbnails of listing photos: /img/{listing_id}/{n} (and /img?id=…&n=… for the ids `.` and `..`, which
browsers resolve out of a path), never an open proxy.

Only the n-th image URI of a listing stored in the database is ever fetched (nothing from the request but
the listing id and an index), through the worker's guarded fetcher (`core.images.load_image`: allow-listed
sources, pinned public addresses, byte and pixel limits, refused formats). The result is shrunk to at most
THUMB_PX and cached on disk under <data dir>/console-thumbs, keyed by the sha256 of the URI, and served as
JPEG. An image that cannot be used gets a grey placeholder. A refusal is remembered next to the cache for
REFUSAL_TTL_S only, and only for the settings that decided it (the guarded fetcher's allow-lists and limits,
see `fetch_rules`): changing them takes effect at once. A host that is down is tried again next time. An
unknown listing or index is a 404.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from PIL import Image

from core.config import Settings
from core.files import write_bytes_atomic
from core.images import ImageError, ImageRejected, load_image
from core.rows import fetch_value
from core.s3 import S3Client, make_s3_client
from enrich.console.auth import User, current_user
from enrich.console.deps import connection
from schemas.events import MAX_IMAGES

log = logging.getLogger(__name__)
router = APIRouter()
THUMB_PX = 320
_QUALITY = 82
_HEADERS = {"Cache-Control": "private, max-age=3600"}
# a refused image is not fetched again for this long: the refusal may be the source's (a 404 that gets fixed)
REFUSAL_TTL_S = 600


def fetch_rules(settings: Settings) -> str:
    """A digest of the settings core.images consults to accept or refuse an image: the sources it allows and
    the limits it applies. A refusal made under other rules does not count."""
    rules = {"allowed_hosts": sorted(settings.allowed_hosts), "allow_private_networks": settings.allow_private_networks,
             "allow_local_paths": settings.allow_local_paths, "max_image_bytes": settings.max_image_bytes,
             "max_image_pixels": settings.max_image_pixels, "s3_endpoint_url": settings.s3_endpoint_url}
    return hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()


def _refused_now(path: Path, rules: str) -> bool:
    """A refusal recorded under the same rules within REFUSAL_TTL_S."""
    try:
        if time.time() - path.stat().st_mtime >= REFUSAL_TTL_S:
            return False
        return path.read_text(errors="replace").split("\n", 1)[0] == rules
    except FileNotFoundError:
        return False


def thumbs_dir(settings: Settings) -> Path:
    return Path(settings.data_dir) / "console-thumbs"


@lru_cache(maxsize=1)
def placeholder() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (THUMB_PX, THUMB_PX), (228, 231, 236)).save(buf, "JPEG", quality=60)
    return buf.getvalue()


def make_thumbnail(uri: str, settings: Settings, s3_client: S3Client | None = None) -> tuple[bytes, bool]:
    """(JPEG bytes, True) for a usable image; (placeholder, False) otherwise. Cached on disk."""
    key = hashlib.sha256(uri.encode()).hexdigest()
    root = thumbs_dir(settings)
    path, refused = root / f"{key}.jpg", root / f"{key}.refused"
    if path.is_file():
        return path.read_bytes(), True
    rules = fetch_rules(settings)
    if _refused_now(refused, rules):
        return placeholder(), False
    try:
        img = load_image(uri, settings, target_size=THUMB_PX, s3_client=s3_client)
        img.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=_QUALITY)
    except ImageError as exc:
        log.info("no thumbnail for an image: %s", exc)
        if isinstance(exc, ImageRejected):  # permanent under these rules: not fetched again for a while
            write_bytes_atomic(refused, f"{rules}\n{exc.reason}".encode())
        return placeholder(), False
    except Exception:  # a broken image must not break the page; the placeholder says so
        log.warning("thumbnail failed", exc_info=True)
        return placeholder(), False
    data = buf.getvalue()
    write_bytes_atomic(path, data)
    return data, True


def _s3_client(request: Request, uri: str) -> S3Client | None:
    if not uri.startswith("s3://"):
        return None
    client = getattr(request.app.state, "thumb_s3_client", None)
    if client is None:
        client = request.app.state.thumb_s3_client = make_s3_client(request.app.state.settings)
    return client


@router.get("/img")
def thumbnail_by_query(request: Request, listing_id: str = Query(alias="id", max_length=128), n: int = Query(0),
                       user: User = Depends(current_user)):
    """The same thumbnail for any id, `.` and `..` included."""
    return thumbnail(request, listing_id, n, user)


@router.get("/img/{listing_id}/{n}")
def thumbnail(request: Request, listing_id: str = PathParam(max_length=128),
              n: int = PathParam(), user: User = Depends(current_user)):
    if not 0 <= n < MAX_IMAGES:
        raise HTTPException(status_code=404, detail="no such listing image")
    with connection(request) as conn:
        uri = fetch_value(conn, "SELECT event->'images'->>%s::int FROM listings WHERE listing_id = %s",
                          (n, listing_id))
    if uri is None:  # no such listing, or no n-th image
        raise HTTPException(status_code=404, detail="no such listing image")
    settings = request.app.state.settings
    data, ok = make_thumbnail(uri, settings, _s3_client(request, uri))
    headers = dict(_HEADERS) if ok else {"Cache-Control": "no-store", "X-Thumbnail": "placeholder"}
    return Response(data, media_type="image/jpeg", headers=headers)
