"""Both decoders (Pillow in draft mode; torchvision's batched JPEG decoder, on the CPU here and on CUDA where
there is one) give the same model inputs and predictions on the same photos."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from core.images import ImageError, ImageLimits
from model.inference import load_predictor
from worker.decode import JpegBytes, PillowDecoder, TorchJpegDecoder, make_decoder

LIMITS = ImageLimits(max_bytes=20 * 1024 * 1024, max_pixels=40_000_000)


def photo(size: tuple[int, int], seed: int, mode: str = "RGB", orientation: int | None = None) -> bytes:
    """A photo-like JPEG: a lit background, a few blurred shapes, sensor grain."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(60, 200, 3)
    arr = base + 50 * np.stack([np.sin(xx / w * 3 + c) * np.cos(yy / h * 2 + c) for c in range(3)], -1)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        draw.ellipse((x0, y0, x0 + w // 4, y0 + h // 3), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img = img.filter(ImageFilter.GaussianBlur(max(1, w // 400)))
    grain = rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


PHOTOS = [photo((1600, 1200), 1), photo((900, 1200), 2), photo((640, 480), 3), photo((1200, 900), 4, orientation=6),
          photo((800, 600), 5, mode="L"), photo((700, 500), 6, orientation=3), photo((500, 700), 7, orientation=8)]


def _inputs(decoder, photos: list[bytes]) -> torch.Tensor:
    prepared = [decoder.prepare(p, f"photo-{i}") for i, p in enumerate(photos)]
    return torch.stack([x.cpu() for x in decoder.finish(prepared)])


def _same_predictions(predictor, device: str) -> None:
    pillow = PillowDecoder(predictor, LIMITS)
    batched = TorchJpegDecoder(predictor, LIMITS, device=device)
    assert all(isinstance(batched.prepare(p), JpegBytes) for p in PHOTOS)  # all go through the batch decoder
    a, b = _inputs(pillow, PHOTOS), _inputs(batched, PHOTOS)
    assert a.shape == b.shape == (len(PHOTOS), 3, predictor.manifest.image_size, predictor.manifest.image_size)
    std = torch.tensor(predictor.manifest.normalisation.std).view(1, 3, 1, 1)
    assert ((a - b).abs() * std).mean(dim=(1, 2, 3)).max() < 0.01  # per photo, mean pixel difference < 1 %
    pa, pb = predictor.predict(a), predictor.predict(b)
    assert np.abs(pa.category - pb.category).max() < 0.05
    assert (pa.category.argmax(1) == pb.category.argmax(1)).mean() >= 6 / 7
    assert (pa.embedding * pb.embedding).sum(1).min() > 0.98  # cosine similarity of the L2-normalised embeddings


def test_decoders_give_the_same_predictions_on_cpu(predictor):
    _same_predictions(predictor, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decoders_give_the_same_predictions_on_cuda(model_dir):
    _same_predictions(load_predictor(model_dir, device="cuda"), "cuda")


def test_exif_orientation_applied_by_the_batch_decoder(predictor):
    """A photo stored sideways (orientation 6) comes out as the upright one, by either decoder."""
    upright = photo((600, 300), 9)
    img = Image.open(io.BytesIO(upright))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=95, exif=exif)
    batched = TorchJpegDecoder(predictor, LIMITS, device="cpu")
    a, b = _inputs(batched, [upright]), _inputs(batched, [buf.getvalue()])
    assert (a - b).abs().mean() < 0.1
    flipped = _inputs(batched, [photo((600, 300), 9, orientation=3)])  # stored as is, shown rotated 180°
    assert (a - flipped).abs().mean() > 5 * (a - b).abs().mean()


def test_batch_decoder_leaves_cmyk_and_other_formats_to_pillow(predictor):
    batched = TorchJpegDecoder(predictor, LIMITS, device="cpu")
    buf = io.BytesIO()
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(buf, format="JPEG")
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (0, 200, 0)).save(png, format="PNG")
    assert isinstance(batched.prepare(buf.getvalue()), torch.Tensor)
    assert isinstance(batched.prepare(png.getvalue()), torch.Tensor)


def test_batch_decoder_leaves_jpegs_over_the_pixel_limit_to_pillows_reduced_scale(predictor):
    tight = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=1_000_000)
    batched = TorchJpegDecoder(predictor, tight, device="cpu")
    assert isinstance(batched.prepare(PHOTOS[0]), torch.Tensor)  # 1.9 MP: decoded at 1/2+ by Pillow
    assert isinstance(batched.prepare(PHOTOS[2]), JpegBytes)


def test_one_broken_jpeg_in_a_batch_fails_alone(predictor):
    """The batch call refuses a whole batch for one truncated file: each is decoded again, the bad one refused."""
    batched = TorchJpegDecoder(predictor, LIMITS, device="cpu")
    broken = PHOTOS[2][: len(PHOTOS[2]) // 2]
    prepared = [batched.prepare(p) for p in (PHOTOS[1], broken, PHOTOS[2])]
    assert all(isinstance(p, JpegBytes) for p in prepared)  # the header alone looks fine
    out = batched.finish(prepared)
    assert isinstance(out[1], ImageError) and out[1].reason == "corrupt image"
    good = _inputs(PillowDecoder(predictor, LIMITS), [PHOTOS[1], PHOTOS[2]])
    assert torch.allclose(torch.stack([out[0], out[2]]), good)


def test_cpu_workers_decode_with_pillow(predictor):
    assert type(make_decoder(predictor, LIMITS)) is PillowDecoder
