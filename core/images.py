"""Fetch, guard and decode listing images.

Every image comes from a seller, so every byte is hostile until proven otherwise: sources are
allow-listed (s3://, allow-listed http(s) hosts resolved and pinned to public addresses, files under the
data directory, other local paths only when enabled), sizes are bounded before decoding, and decoding refuses
bombs and odd formats with a reason a person can read. Two error kinds matter to the caller: `ImageRejected` is
permanent (retrying cannot help), `ImageUnavailable` is transient (host down, timeout: retry with backoff).
"""
from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image, ImageOps, UnidentifiedImageError

from core.config import Settings
from core.s3 import S3Client, make_s3_client

# WebP, PNG and JPEG cover seller photos; GIF too (only its first frame is decoded, so an animated one
# yields a still photo). TIFF/BMP/PSD etc. are refused (odd codecs, a larger decoder attack surface for
# no benefit).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
DCT_SCALES = (1, 2, 4, 8)  # the reductions a JPEG decoder can apply while decoding (Pillow's draft mode)
MAX_REDIRECTS = 3
_USER_AGENT = "catalogue-enrich/0.1"


class ImageError(Exception):
    """Base: carries the URI and a short, human-readable reason (also the metrics label)."""

    def __init__(self, uri: str, reason: str, detail: str = "") -> None:
        self.uri = uri
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail} ({_short(uri)})" if detail else f"{reason} ({_short(uri)})")


class ImageRejected(ImageError):
    """Permanent: the source or the bytes are not acceptable. Never retried."""


class ImageUnavailable(ImageError):
    """Transient: the source could not be reached now. Worth a retry later."""


def _short(uri: str) -> str:
    return uri if len(uri) <= 120 else uri[:117] + "..."


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    formats: tuple[str, ...] = ALLOWED_FORMATS

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)


# ---------------------------------------------------------------------------------------------- fetch

def fetch_bytes(uri: str, settings: Settings, s3_client: S3Client | None = None) -> bytes:
    """Bytes of one image, or ImageRejected / ImageUnavailable."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "s3":
        return _fetch_s3(uri, settings, s3_client)
    if scheme in ("http", "https"):
        return _fetch_http(uri, settings)
    if scheme in ("", "file") or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):
        return _fetch_local(uri, settings)
    raise ImageRejected(uri, "scheme not allowed", f"{scheme}:// is not s3, http(s) or a local path")


def _own_file(path: Path, settings: Settings) -> bool:
    """A file of this installation: under the data directory once links are resolved (the quickstart's
    photos); a link out of it does not count."""
    try:
        return path.resolve(strict=True).is_relative_to(Path(settings.data_dir).resolve())
    except (OSError, RuntimeError):
        return False


def _fetch_local(uri: str, settings: Settings) -> bytes:
    path = Path(urlsplit(uri).path if uri.startswith("file:") else uri)
    if not settings.allow_local_paths and not _own_file(path, settings):
        raise ImageRejected(uri, "local paths disabled", "only files under the data directory are read; set "
                                                         "ENRICH_ALLOW_LOCAL_PATHS=true to read any file")
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ImageRejected(uri, "not a file")
        if size > settings.max_image_bytes:
            raise ImageRejected(uri, "too many bytes", f"{size} > {settings.max_image_bytes}")
        with path.open("rb") as f:
            return f.read(settings.max_image_bytes + 1)
    except FileNotFoundError as exc:
        raise ImageRejected(uri, "not found") from exc
    except PermissionError as exc:
        raise ImageRejected(uri, "permission denied") from exc


def _fetch_s3(uri: str, settings: Settings, client: S3Client | None) -> bytes:
    parts = urlsplit(uri)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if not bucket or not key:
        raise ImageRejected(uri, "bad s3 uri", "expected s3://bucket/key")
    client = client or make_s3_client(settings)
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "NoSuchBucket", "404", "AccessDenied", "403") or 400 <= status < 500:
            raise ImageRejected(uri, "s3 object not readable", code or str(status)) from exc
        raise ImageUnavailable(uri, "s3 unavailable", code or str(status)) from exc
    except BotoCoreError as exc:  # connection refused, timeouts
        raise ImageUnavailable(uri, "s3 unavailable", type(exc).__name__) from exc
    body = obj["Body"]
    try:
        if obj.get("ContentLength", 0) > settings.max_image_bytes:
            raise ImageRejected(uri, "too many bytes", f"{obj['ContentLength']} > {settings.max_image_bytes}")
        data: bytes = body.read(settings.max_image_bytes + 1)
    finally:
        body.close()
    if len(data) > settings.max_image_bytes:
        raise ImageRejected(uri, "too many bytes", f"> {settings.max_image_bytes}")
    return data


def check_address(ip: str, allow_private: bool) -> None:
    """Refuse addresses an outside URL must never reach (SSRF): loopback, private, link-local…"""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    if addr.is_multicast or addr.is_unspecified or addr.is_reserved:
        raise ValueError(f"{ip} is not a unicast address")
    if allow_private:
        return
    if addr.is_loopback or addr.is_private or addr.is_link_local or not addr.is_global:
        raise ValueError(f"{ip} is a loopback, private or link-local address")


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Exact host match, or a suffix match for entries written as '.example.com'."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith(".") and (host.endswith(entry) or host == entry[1:]):
            return True
        if host == entry:
            return True
    return False


def _resolve(uri: str, host: str, port: int, settings: Settings) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ImageUnavailable(uri, "host not resolvable", host) from exc
    ips = [str(sockaddr[0]) for *_, sockaddr in infos]
    # every address must pass, not just one: a DNS answer mixing public and private is an attack
    for ip in ips:
        try:
            check_address(ip, settings.allow_private_networks)
        except ValueError as exc:
            raise ImageRejected(uri, "address not allowed", str(exc)) from exc
    return ips[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address we checked, so DNS cannot change between check and connect."""

    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def _read_limited(uri: str, resp: http.client.HTTPResponse, max_bytes: int, total_s: float) -> bytes:
    """Read a body with a byte cap and a total deadline (the socket timeout alone allows slow drips)."""
    deadline = time.monotonic() + total_s
    buf = bytearray()
    while True:
        chunk = resp.read(64 * 1024)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > max_bytes:
            raise ImageRejected(uri, "too many bytes", f"> {max_bytes}")
        if time.monotonic() > deadline:
            raise ImageUnavailable(uri, "http too slow", f"body not read in {total_s:.0f}s")


def _fetch_http(uri: str, settings: Settings) -> bytes:
    url = uri
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), (parts.hostname or "")
        if scheme not in ("http", "https"):
            raise ImageRejected(uri, "redirect not allowed", f"to scheme {scheme!r}")
        if parts.username or parts.password:
            raise ImageRejected(uri, "credentials in url")
        if not host_allowed(host, settings.allowed_hosts):
            raise ImageRejected(uri, "host not allowed", host)
        port = parts.port or (443 if scheme == "https" else 80)
        ip = _resolve(uri, host, port, settings)
        conn_cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = conn_cls(host, port, ip, settings.fetch_timeout_s)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.request("GET", path, headers={"User-Agent": _USER_AGENT, "Accept": "image/*"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise ImageRejected(uri, "bad redirect", "no Location header")
                url = urljoin(url, location)  # re-checked against the allow-list and IP rules above
                continue
            if resp.status == 429 or resp.status >= 500:
                raise ImageUnavailable(uri, "http server error", str(resp.status))
            if resp.status != 200:
                raise ImageRejected(uri, "http error", str(resp.status))
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > settings.max_image_bytes:
                raise ImageRejected(uri, "too many bytes", f"{length} > {settings.max_image_bytes}")
            return _read_limited(uri, resp, settings.max_image_bytes, settings.fetch_timeout_s * 3)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, TLS
            raise ImageUnavailable(uri, "http unavailable", type(exc).__name__) from exc
        finally:
            conn.close()
    raise ImageRejected(uri, "too many redirects", str(MAX_REDIRECTS))


# --------------------------------------------------------------------------------------------- decode

def open_image(data: bytes, limits: ImageLimits, uri: str = "") -> Image.Image:
    """Bytes → a guarded Pillow image, header read and nothing decoded yet; or ImageRejected with the reason.

    The pixel limit guards decoded pixels: a JPEG over it is accepted when a DCT scale (1/2, 1/4,
    1/8) brings it within (see `jpeg_scale`); any other format over it, or a JPEG too big even at
    1/8, is refused as a decompression bomb.
    """
    if not data:
        raise ImageRejected(uri, "empty file")
    if len(data) > limits.max_bytes:
        raise ImageRejected(uri, "too many bytes", f"{len(data)} > {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            # our limit below decides; Pillow's fixed warning level would refuse phone photos we decode scaled
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except UnidentifiedImageError as exc:
        fmt = _sniff_format(data)
        if fmt:
            raise ImageRejected(uri, "format not allowed", f"{fmt}; allowed: {', '.join(limits.formats)}") from exc
        raise ImageRejected(uri, "not an image") from exc
    except Image.DecompressionBombError as exc:  # Pillow's own ceiling (2 × Image.MAX_IMAGE_PIXELS)
        raise ImageRejected(uri, "too many pixels", "decompression bomb") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected(uri, "corrupt image", str(exc)[:200]) from exc
    # checked on the header, before a single pixel is decoded
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageRejected(uri, "corrupt image", "zero size")
    if w * h > limits.max_pixels:
        if img.format != "JPEG":
            raise ImageRejected(uri, "too many pixels", f"{w}x{h} > {limits.max_pixels}")
        if jpeg_scale(w, h, limits.max_pixels) is None:
            raise ImageRejected(uri, "too many pixels", f"{w}x{h} JPEG: over {limits.max_pixels} even at 1/8 scale")
    return img


def jpeg_scale(width: int, height: int, max_pixels: int, target_size: int | None = None) -> int | None:
    """The DCT scale denominator (1, 2, 4 or 8) to decode a JPEG at, or None when even 1/8 is too many pixels.

    The smallest reduction that brings the decoded pixels within max_pixels; with target_size, further
    down as long as both sides stay at least target_size (the model shrinks the photo anyway).
    """
    fits = [s for s in DCT_SCALES if -(-width // s) * -(-height // s) <= max_pixels]
    if not fits:
        return None
    scale = fits[0]
    if target_size:
        scale = max(scale, max(s for s in DCT_SCALES if s == 1 or min(width, height) >= s * target_size))
    return scale


def decode_image(data: bytes, limits: ImageLimits, target_size: int | None = None, uri: str = "") -> Image.Image:
    """Bytes → an upright 8-bit RGB image, or ImageRejected with the reason.

    target_size lets JPEG decode at a reduced scale (draft mode): 4–8× faster for big photos
    that the model shrinks to a few hundred pixels anyway.
    """
    return decode_opened(open_image(data, limits, uri), limits, target_size, uri)


def decode_opened(img: Image.Image, limits: ImageLimits, target_size: int | None = None, uri: str = "") -> Image.Image:
    """Decode an image from `open_image`: JPEG at its DCT scale (`jpeg_scale`); other formats whole, and
    only their first frame (an animated GIF's first frame is a usable photo)."""
    w, h = img.size
    try:
        if img.format == "JPEG":
            scale = jpeg_scale(w, h, limits.max_pixels, target_size)
            if scale is not None and scale > 1:
                img.draft("RGB", (max(1, w // scale), max(1, h // scale)))
        img.load()
        if img.width * img.height > limits.max_pixels:  # the scale Pillow chose did not fit after all
            raise ImageRejected(uri, "too many pixels", f"{w}x{h} decodes to {img.width}x{img.height}")
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # "image file is truncated", broken chunks, bad EXIF
        raise ImageRejected(uri, "corrupt image", str(exc)[:200]) from exc
    return to_rgb(img, uri)


def to_rgb(img: Image.Image, uri: str = "") -> Image.Image:
    """Normalise pixel modes to 8-bit RGB; refuse the ones with no faithful conversion."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    if mode in ("P", "PA"):
        img = img.convert("RGBA")  # palette may carry transparency; composite below
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        # transparent product cut-outs: composite on white, as shops display them
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale: scale to 8-bit by the actual range rather than clipping at 255
        arr = np.asarray(img, dtype=np.float64)
        if arr.ndim != 2:
            raise ImageRejected(uri, "unsupported pixel mode", mode)
        top = 65535.0 if arr.max() > 255 else 255.0
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype("uint8")
        return Image.fromarray(arr8, mode="L").convert("RGB")
    raise ImageRejected(uri, "unsupported pixel mode", mode)


def _sniff_format(data: bytes) -> str | None:
    """Name a known-but-refused format for a clearer message."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Exception:
        return None


def load_image(uri: str, settings: Settings, target_size: int | None = None,
               s3_client: S3Client | None = None) -> Image.Image:
    """Fetch + guard + decode one image URI."""
    data = fetch_bytes(uri, settings, s3_client=s3_client)
    return decode_image(data, ImageLimits.from_settings(settings), target_size=target_size, uri=uri)
