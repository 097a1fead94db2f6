"""JPEG bytes → the model's input tensor: img/s of each decoder the worker can use (worker/decode.py).

    python benchmarks/decode_speed.py [--photos 24] [--image-size 224] [--seconds 6]

Decoders, each timed from JPEG bytes to a normalised image_size² CHW tensor, one image at a time on one
thread (the worker runs several such threads), after a warm-up:
  pillow-draft   Pillow in draft mode: decodes at the DCT scale (1/2…1/8) that still covers image_size
                 (PillowDecoder, what CPU workers use);
  pillow-full    Pillow decoding every pixel, then resizing (what draft mode saves);
  torchvision    torchvision.io.decode_jpeg on the CPU in batches of --batch, resized with torch
                 (TorchJpegDecoder on the CPU);
  torchvision-cuda  the same on the GPU (nvJPEG), when there is one (what CUDA workers use).
Two photo sets: phone photos (real photos from scikit-image's data, upscaled to 1000–4000 px on the long
side with sensor grain, quality 90) and the 256 px product shots benchmarks/pipeline_throughput.py sends.
Prints img/s (wall clock) and img per CPU-second, and each decoder's ratio to pillow-draft.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.images import ImageLimits  # noqa: E402
from model.inference import image_to_tensor  # noqa: E402
from worker.decode import PillowDecoder, TorchJpegDecoder  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")


def phone_photos(n: int, seed: int = 0) -> list[bytes]:
    """Real photos upscaled to phone sizes (1000–4000 px long side, 4:3 or 3:4) with grain, as JPEG q90."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in SOURCES]
    out = []
    for i in range(n):
        long = int(rng.integers(1000, 4001))
        size = (long, long * 3 // 4) if i % 3 else (long * 3 // 4, long)
        img = sources[i % len(sources)].resize(size, Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, (size[1], size[0], 1)).astype(np.float32)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def product_shots(n: int, fmnist_dir: Path) -> list[bytes]:
    """The 256 px FMNIST-shop JPEGs of benchmarks/pipeline_throughput.py."""
    import tempfile

    from benchmarks.pipeline_throughput import make_images

    with tempfile.TemporaryDirectory() as tmp:
        return [p.read_bytes() for p in make_images(Path(tmp), n, 256, fmnist_dir)]


def stub_predictor(image_size: int, device: str = "cpu"):
    """What the decoders read from a predictor: the input size, normalisation and preprocess."""
    manifest = SimpleNamespace(image_size=image_size, normalisation=SimpleNamespace(mean=MEAN, std=STD))
    return SimpleNamespace(manifest=manifest, device=torch.device(device),
                           preprocess=lambda img: image_to_tensor(img, image_size, MEAN, STD))


class PillowFull(PillowDecoder):
    """Pillow without draft mode: every pixel decoded, then resized."""

    def prepare(self, data: bytes, uri: str = ""):
        from core.images import decode_image

        return self.predictor.preprocess(decode_image(data, self.limits, target_size=None, uri=uri))


def rate(decoder, photos: list[bytes], batch: int, seconds: float, cuda: bool) -> tuple[float, float]:
    """(img/s wall clock, img per CPU-second): prepare + finish, `batch` photos per finish call."""
    def one_pass(chunk: list[bytes]) -> None:
        out = decoder.finish([decoder.prepare(p) for p in chunk])
        if cuda:
            torch.cuda.synchronize()
        assert all(isinstance(x, torch.Tensor) for x in out)

    one_pass(photos[:batch])  # warm-up (and the CUDA context)
    n, i = 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        chunk = [photos[(i + k) % len(photos)] for k in range(batch)]
        one_pass(chunk)
        n += batch
        i += batch
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main() -> None:
    import warnings

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=24, help="phone photos generated (default: 24)")
    ap.add_argument("--image-size", type=int, default=224, help="model input size (default: 224)")
    ap.add_argument("--batch", type=int, default=16, help="photos per batched decode call (default: 16)")
    ap.add_argument("--seconds", type=float, default=6.0, help="timing per decoder and set (default: 6)")
    ap.add_argument("--fmnist-dir", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST idx files")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision 0.29 points to TorchCodec
    torch.set_num_threads(1)

    limits = ImageLimits(max_bytes=20 * 1024 * 1024, max_pixels=40_000_000)
    sets = {"phone photos 1000-4000 px": phone_photos(args.photos),
            "product shots 256 px": product_shots(64, Path(args.fmnist_dir))}
    decoders = {"pillow-draft": (PillowDecoder(stub_predictor(args.image_size), limits), False),
                "pillow-full": (PillowFull(stub_predictor(args.image_size), limits), False),
                "torchvision": (TorchJpegDecoder(stub_predictor(args.image_size), limits), False)}
    if torch.cuda.is_available():
        decoders["torchvision-cuda"] = (TorchJpegDecoder(stub_predictor(args.image_size, "cuda"), limits), True)
    for name, photos in sets.items():
        mp = np.mean([np.prod(Image.open(io.BytesIO(p)).size) for p in photos]) / 1e6
        kb = np.mean([len(p) for p in photos]) / 1024
        print(f"{name}: {len(photos)} JPEGs, mean {mp:.2f} MP, {kb:.0f} KiB; to {args.image_size}px tensors, 1 thread")
        base = None
        for label, (decoder, cuda) in decoders.items():
            ips, ipc = rate(decoder, photos, args.batch, args.seconds, cuda)
            base = base or (ips, ipc)
            print(f"  {label:<17} {ips:8.1f} img/s  {ipc:8.1f} img/CPU-s   ratio to pillow-draft "
                  f"{ips / base[0]:.2f} wall, {ipc / base[1]:.2f} per CPU-s", flush=True)
    print(f"machine: {torch.get_num_threads()} torch thread, {len(__import__('os').sched_getaffinity(0))} CPUs; "
          f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")


if __name__ == "__main__":
    main()
