"""Big phone photos decoded at a reduced DCT scale instead of refused; bombs still refused; GIF's first frame."""
from __future__ import annotations

import io

import pytest
from PIL import Image, ImageDraw

from core.images import ImageLimits, ImageRejected, decode_image, jpeg_scale

LIMITS = ImageLimits(max_bytes=20 * 1024 * 1024, max_pixels=4_000_000)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _phone_photo(size=(8000, 6000)) -> bytes:
    """A 48 MP JPEG: red left half, blue right half (what a current phone takes, in pixels)."""
    img = Image.new("RGB", size, (220, 30, 30))
    ImageDraw.Draw(img).rectangle((size[0] // 2, 0, size[0], size[1]), fill=(30, 30, 220))
    return _save(img, "JPEG", quality=85)


def _reason(data: bytes, limits: ImageLimits = LIMITS) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, limits)
    return info.value


def _with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with the frame header (SOF0) claiming another size: a bomb costs a few bytes."""
    sof = data.index(b"\xff\xc0")
    out = bytearray(data)
    out[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(out)


@pytest.fixture(scope="module")
def phone_photo() -> bytes:
    return _phone_photo()


def test_48mp_jpeg_decoded_at_the_largest_scale_within_the_limit(phone_photo):
    img = decode_image(phone_photo, LIMITS)  # 48 MP > 4 MP: 1/2 is 12 MP, 1/4 is 3 MP
    assert img.size == (2000, 1500) and img.mode == "RGB"
    assert img.getpixel((500, 750))[0] > 180 and img.getpixel((1500, 750))[2] > 180
    default = ImageLimits(max_bytes=20 * 1024 * 1024, max_pixels=40_000_000)
    assert decode_image(phone_photo, default).size == (4000, 3000)


def test_big_jpeg_for_the_model_decodes_at_the_scale_its_input_needs(phone_photo):
    assert decode_image(phone_photo, LIMITS, target_size=224).size == (1000, 750)  # 1/8 still ≥ 224
    assert decode_image(phone_photo, LIMITS, target_size=1000).size == (2000, 1500)  # the limit decides


def test_png_over_the_limit_refused_where_a_jpeg_that_size_decodes():
    img = Image.new("RGB", (2500, 2000), (10, 120, 10))  # 5 MP > 4 MP
    assert "2500x2000" in str(_reason(_save(img, "PNG"))) and _reason(_save(img, "PNG")).reason == "too many pixels"
    assert decode_image(_save(img, "JPEG"), LIMITS).size == (1250, 1000)


def test_png_bomb_refused():
    data = _save(Image.new("1", (20000, 20000), 0), "PNG")  # 400 MP in a few tens of KB
    assert len(data) < 100_000
    assert _reason(data).reason == "too many pixels"


def test_jpeg_header_too_big_even_at_one_eighth_refused():
    small = _save(Image.new("RGB", (64, 48), (200, 200, 200)), "JPEG")
    tight = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=100_000)
    err = _reason(_with_jpeg_size(small, 4000, 3000), tight)  # 1/8 is 500x375 = 187 500 px
    assert err.reason == "too many pixels" and "1/8" in str(err)
    assert _reason(_with_jpeg_size(small, 60000, 60000)).reason == "too many pixels"  # 3.6 GP


def test_jpeg_scale():
    assert jpeg_scale(8000, 6000, 40_000_000) == 2
    assert jpeg_scale(8000, 6000, 40_000_000, target_size=224) == 8
    assert jpeg_scale(1000, 800, 40_000_000, target_size=224) == 2
    assert jpeg_scale(200, 200, 40_000_000, target_size=224) == 1
    assert jpeg_scale(4000, 3000, 100_000) is None


def test_animated_gif_first_frame_used():
    frames = [Image.new("RGB", (40, 30), c).convert("P") for c in ((230, 10, 10), (10, 230, 10), (10, 10, 230))]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    img = decode_image(data, LIMITS)
    assert img.mode == "RGB" and img.size == (40, 30)
    r, g, b = img.getpixel((20, 15))
    assert r > 200 and g < 40 and b < 40


def test_gif_over_the_limit_refused():
    data = _save(Image.new("P", (2500, 2000), 1), "GIF")
    assert _reason(data).reason == "too many pixels"
