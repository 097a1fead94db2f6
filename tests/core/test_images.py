"""Image fetch + guard + decode against real bytes, a real HTTP server and a real S3 API server."""
from __future__ import annotations

import io

import boto3
import numpy as np
import pytest
from PIL import Image

from core.images import (
    ImageLimits,
    ImageRejected,
    ImageUnavailable,
    check_address,
    decode_image,
    fetch_bytes,
    host_allowed,
    load_image,
)
from harness.images import jpeg_bytes, png_bytes
from harness.net import free_port
from tests.worker.conftest import make_settings

LIMITS = ImageLimits(max_bytes=2 * 1024 * 1024, max_pixels=4_000_000)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _reason(data: bytes) -> str:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, LIMITS)
    return info.value.reason


# ------------------------------------------------------------------------------------- hostile bytes

def test_zero_bytes_rejected():
    assert _reason(b"") == "empty file"


def test_truncated_png_and_jpeg_rejected():
    assert _reason(png_bytes(size=(200, 200))[:-200]) == "corrupt image"
    assert _reason(jpeg_bytes(size=(300, 200))[:400]) == "corrupt image"


def test_non_image_rejected():
    assert _reason(b"<html><body>not a picture</body></html>" * 10) == "not an image"


def test_tiff_refused_by_format_allow_list():
    data = _save(Image.new("RGB", (20, 20), (3, 3, 3)), "TIFF")
    with pytest.raises(ImageRejected) as info:
        decode_image(data, LIMITS)
    assert info.value.reason == "format not allowed" and "TIFF" in str(info.value)


def test_decompression_bomb_rejected_before_decoding():
    # 3000x3000 1-bit PNG: a few KB on disk, 9 M pixels (> 4 M limit)
    data = _save(Image.new("1", (3000, 3000), 0), "PNG")
    assert len(data) < 10_000
    assert _reason(data) == "too many pixels"


def test_byte_limit():
    small = ImageLimits(max_bytes=1024, max_pixels=4_000_000)
    with pytest.raises(ImageRejected) as info:
        decode_image(jpeg_bytes(size=(200, 200)), small)
    assert info.value.reason == "too many bytes"


# ------------------------------------------------------------------------------------- conversions

def test_cmyk_jpeg_converted_to_rgb():
    img = decode_image(_save(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"), LIMITS)
    assert img.mode == "RGB" and img.size == (30, 20)
    r, g, b = img.getpixel((15, 10))
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full → red


def test_16bit_png_scaled_to_8bit():
    arr = np.full((10, 12), 40000, dtype=np.uint16)
    data = _save(Image.fromarray(arr), "PNG")
    img = decode_image(data, LIMITS)
    assert img.mode == "RGB" and img.size == (12, 10)
    assert img.getpixel((0, 0))[0] == round(40000 / 65535 * 255)


def test_palette_with_transparency_composited_on_white():
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    data = _save(pal, "PNG", transparency=0)
    assert decode_image(data, LIMITS).getpixel((5, 5)) == (255, 255, 255)


def test_rgba_alpha_composited():
    data = _save(Image.new("RGBA", (8, 8), (0, 0, 255, 0)), "PNG")
    assert decode_image(data, LIMITS).getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_applied():
    img = Image.new("RGB", (64, 48), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = decode_image(_save(img, "JPEG", exif=exif), LIMITS)
    assert out.size == (48, 64)


def test_jpeg_draft_decodes_at_reduced_scale():
    big = jpeg_bytes(size=(1600, 1200))
    full = decode_image(big, LIMITS)
    fast = decode_image(big, LIMITS, target_size=64)
    assert full.size == (1600, 1200)
    assert 64 <= min(fast.size) < 1200 / 4 and fast.mode == "RGB"


# ------------------------------------------------------------------------------------------- fetch

def test_local_paths_only_when_enabled(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes())
    with pytest.raises(ImageRejected, match="local paths disabled"):
        fetch_bytes(str(path), make_settings(allow_local_paths=False))
    assert load_image(str(path), make_settings()).size == (40, 48)
    with pytest.raises(ImageRejected, match="not found"):
        fetch_bytes(str(tmp_path / "missing.png"), make_settings())


def test_files_under_the_data_directory_are_read_with_local_paths_off(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "elsewhere"
    (data / "quickstart").mkdir(parents=True)
    outside.mkdir()
    own, foreign = data / "quickstart" / "a.png", outside / "b.png"
    own.write_bytes(png_bytes())
    foreign.write_bytes(png_bytes())
    (data / "link.png").symlink_to(foreign)
    strict = make_settings(data_dir=data, allow_local_paths=False)
    assert fetch_bytes(str(own), strict) == own.read_bytes()
    assert load_image(f"file://{own}", strict).size == (40, 48)
    for sneaky in (foreign, data / "link.png", data / ".." / "elsewhere" / "b.png"):
        with pytest.raises(ImageRejected, match="local paths disabled"):
            fetch_bytes(str(sneaky), strict)


def test_unknown_scheme_rejected():
    with pytest.raises(ImageRejected, match="scheme not allowed"):
        fetch_bytes("ftp://example.com/a.png", make_settings())


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "192.168.0.9", "169.254.169.254", "::1",
                                "fe80::1", "::ffff:127.0.0.1", "0.0.0.0", "100.64.0.1"])
def test_private_loopback_link_local_refused(ip):
    with pytest.raises(ValueError):
        check_address(ip, allow_private=False)


def test_public_address_allowed():
    check_address("93.184.216.34", allow_private=False)
    check_address("127.0.0.1", allow_private=True)  # tests and on-prem image stores opt in explicitly


def test_host_allow_list():
    assert host_allowed("img.shop.example", ["img.shop.example"])
    assert host_allowed("cdn.shop.example", [".shop.example"])
    assert not host_allowed("shop.example.evil.com", [".shop.example"])
    assert not host_allowed("other.example", ["img.shop.example"])


def test_http_fetch_from_allow_listed_local_server(http_dir):
    base, root = http_dir
    (root / "shirt.png").write_bytes(png_bytes((1, 2, 3)))
    img = load_image(f"{base}/shirt.png", make_settings())
    assert img.getpixel((0, 0)) == (1, 2, 3)


def test_http_host_not_on_allow_list(http_dir):
    base, root = http_dir
    (root / "shirt.png").write_bytes(png_bytes())
    with pytest.raises(ImageRejected, match="host not allowed"):
        fetch_bytes(f"{base}/shirt.png", make_settings(allowed_hosts=["images.example"]))


def test_http_loopback_refused_without_private_opt_in(http_dir):
    base, root = http_dir
    (root / "shirt.png").write_bytes(png_bytes())
    with pytest.raises(ImageRejected) as info:
        fetch_bytes(f"{base}/shirt.png", make_settings(allow_private_networks=False))
    assert info.value.reason == "address not allowed"


def test_redirect_to_link_local_refused(http_dir):
    base, _ = http_dir
    with pytest.raises(ImageRejected, match="host not allowed"):
        fetch_bytes(f"{base}/redirect-loopback", make_settings())


def test_http_errors_split_into_permanent_and_transient(http_dir):
    base, _ = http_dir
    with pytest.raises(ImageRejected, match="http error"):
        fetch_bytes(f"{base}/missing.png", make_settings())
    with pytest.raises(ImageUnavailable):
        fetch_bytes(f"{base}/boom", make_settings())
    dead = free_port()
    with pytest.raises(ImageUnavailable):
        fetch_bytes(f"http://127.0.0.1:{dead}/a.png", make_settings())


def test_s3_fetch(s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="imgs-test")
    client.put_object(Bucket="imgs-test", Key="a/b.png", Body=png_bytes((9, 8, 7)))
    settings = make_settings(s3_endpoint_url=s3_endpoint)
    assert load_image("s3://imgs-test/a/b.png", settings).getpixel((0, 0)) == (9, 8, 7)
    with pytest.raises(ImageRejected, match="s3 object not readable"):
        fetch_bytes("s3://imgs-test/nope.png", settings)


def test_http_byte_limit(http_dir):
    base, root = http_dir
    (root / "huge.jpg").write_bytes(b"\xff\xd8" + b"0" * 3000)
    with pytest.raises(ImageRejected, match="too many bytes"):
        fetch_bytes(f"{base}/huge.jpg", make_settings(max_image_bytes=2048))
