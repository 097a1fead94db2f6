"""Image bytes → the model's input, by the decoder that is faster where the model runs.

Two steps, so that each part runs where it should:
  `prepare(data, uri)`  in the I/O threads: the guard of core.images (format, bytes, pixels), then either
                        a ready CHW tensor or, for a JPEG left to the batch step, its bytes;
  `finish(prepared)`    in the thread that runs the model, once per forward batch: a CHW float tensor on
                        the model's device, or the ImageError that stopped it, per image, in order.

`PillowDecoder` decodes everything in `prepare` with Pillow; a JPEG in draft mode, i.e. at the DCT scale
(1/2…1/8) that still covers the model's input, which makes big photos cheap. It serves CPU workers:
torchvision's decoder has no reduced-scale decoding and is slower on this workload
(benchmarks/decode_speed.py).
`TorchJpegDecoder` leaves JPEGs (YCbCr or grey, within the pixel limit at full size) to `finish`, which
decodes them together with `torchvision.io.decode_jpeg` on the device (nvJPEG on CUDA) and resizes them
there; Pillow decodes the other formats, JPEGs that need a reduced scale to fit the pixel limit, CMYK
ones, and a batch the device decoder refuses. It serves CUDA workers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from core.images import ImageError, ImageLimits, decode_opened, open_image

EXIF_ORIENTATION = 0x0112

# EXIF orientation → the CHW tensor operation that shows the photo upright (as PIL.ImageOps.exif_transpose)
_UPRIGHT = {
    2: lambda x: x.flip(2),
    3: lambda x: x.flip((1, 2)),
    4: lambda x: x.flip(1),
    5: lambda x: x.transpose(1, 2),
    6: lambda x: torch.rot90(x, -1, (1, 2)),
    7: lambda x: x.transpose(1, 2).flip((1, 2)),
    8: lambda x: torch.rot90(x, 1, (1, 2)),
}


class JpegBytes:
    """A guarded JPEG whose pixels are decoded later, with the rest of its forward batch."""

    __slots__ = ("data", "orientation", "uri")

    def __init__(self, data: bytes, orientation: int, uri: str) -> None:
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.orientation = orientation
        self.uri = uri


Prepared = torch.Tensor | JpegBytes


class PillowDecoder:
    """Pillow for every image, in the I/O threads; `finish` only stacks up what `prepare` made."""

    name = "pillow"

    def __init__(self, predictor, limits: ImageLimits) -> None:
        self.predictor = predictor
        self.limits = limits
        self.size = predictor.manifest.image_size

    def prepare(self, data: bytes, uri: str = "") -> Prepared:
        """Guard and decode one image (raises ImageError)."""
        return self._pillow(open_image(data, self.limits, uri), uri)

    def _pillow(self, img: Image.Image, uri: str) -> torch.Tensor:
        return self.predictor.preprocess(decode_opened(img, self.limits, target_size=self.size, uri=uri))

    def finish(self, prepared: list[Prepared]) -> list[torch.Tensor | ImageError]:
        out: list[torch.Tensor | ImageError] = []
        for p in prepared:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{type(p).__name__} is not what {type(self).__name__}.prepare makes")
            out.append(p)
        return out


class TorchJpegDecoder(PillowDecoder):
    """JPEGs decoded in batches by torchvision on `device` (nvJPEG on CUDA) and resized there."""

    name = "torchvision"

    def __init__(self, predictor, limits: ImageLimits, device: torch.device | str | None = None) -> None:
        super().__init__(predictor, limits)
        self.device = torch.device(device or predictor.device)
        norm = predictor.manifest.normalisation
        self.mean = torch.tensor(norm.mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(norm.std, dtype=torch.float32, device=self.device).view(3, 1, 1)

    def prepare(self, data: bytes, uri: str = "") -> Prepared:
        img = open_image(data, self.limits, uri)
        # the device decodes at full size only: a JPEG over the pixel limit needs Pillow's reduced scale
        if img.format == "JPEG" and img.mode in ("RGB", "L") and img.width * img.height <= self.limits.max_pixels:
            try:
                orientation = int(img.getexif().get(EXIF_ORIENTATION, 1))
            except Exception:
                orientation = 0
            if orientation in range(1, 9):
                return JpegBytes(data, orientation, uri)
        return self._pillow(img, uri)

    def finish(self, prepared: list[Prepared]) -> list[torch.Tensor | ImageError]:
        out: dict[int, torch.Tensor | ImageError] = {
            i: p.to(self.device, non_blocking=True) for i, p in enumerate(prepared) if isinstance(p, torch.Tensor)}
        jpegs = [(i, p) for i, p in enumerate(prepared) if isinstance(p, JpegBytes)]
        if jpegs:
            try:
                images = decode_jpeg([p.data for _, p in jpegs], mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                # one undecodable file fails the whole call: Pillow, the reference decoder, takes each in turn
                for i, p in jpegs:
                    out[i] = self._pillow_fallback(p)
            else:
                for (i, p), image in zip(jpegs, images, strict=True):
                    out[i] = self._to_input(image, p.orientation)
        return [out[i] for i in range(len(prepared))]

    def _pillow_fallback(self, jpeg: JpegBytes) -> torch.Tensor | ImageError:
        try:
            img = open_image(jpeg.data.numpy().tobytes(), self.limits, jpeg.uri)
            return self._pillow(img, jpeg.uri).to(self.device)
        except ImageError as exc:
            return exc

    def _to_input(self, image: torch.Tensor, orientation: int) -> torch.Tensor:
        """uint8 CHW → upright, size×size (bilinear, antialiased, as Pillow resizes), normalised float CHW."""
        if orientation in _UPRIGHT:
            image = _UPRIGHT[orientation](image)
        x = F.interpolate(image.unsqueeze(0).float(), size=(self.size, self.size), mode="bilinear",
                          antialias=True, align_corners=False)[0]
        x = x.round_().clamp_(0, 255)  # Pillow's resize yields 8-bit pixels
        return (x / 255.0 - self.mean) / self.std


def make_decoder(predictor, limits: ImageLimits) -> PillowDecoder:
    """The decoder for the predictor's device: batched device decoding on CUDA, Pillow on the CPU."""
    if predictor.device.type == "cuda":
        return TorchJpegDecoder(predictor, limits)
    return PillowDecoder(predictor, limits)
