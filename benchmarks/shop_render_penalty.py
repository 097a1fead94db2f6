"""How much does the FMNIST-shop rendering (colour tint over a grey background) cost the category task?

Trains the small CNN with a linear category head, classification only, for the same steps on (a) the
Fashion-MNIST images themselves (grey, as RGB) and (b) their FMNIST-shop renders, and prints the test
top-1 of each and the ratio. Isolates the data from the multitask recipe.

    python benchmarks/shop_render_penalty.py --steps 5000     # ~6 min on 2 cores
    python benchmarks/shop_render_penalty.py --variants shop,fixed-bg,ramp,colourways4,grey   # ~13 min

Variants that look for the cost: ``fixed-bg`` (one background grey instead of a random one per photo),
``ramp`` (a tint that keeps all the garment's texture: a ramp from a dark to a light shade of the colour,
no clipping on black and white), ``colourways4`` (each training garment rendered in 4 colours, as 4 items).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import training.fmnist_shop as shop_render
from model.backbones import create_backbone
from schemas.taxonomy import load_taxonomy
from training.fmnist import load_fashion_mnist
from training.fmnist_shop import build_shop
from training.transforms import BatchAugment

HALF = ((0.5,) * 3, (0.5,) * 3)


def train_and_test(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   steps: int, batch: int = 64, lr: float = 2e-3) -> float:
    torch.manual_seed(0)
    net = torch.nn.Sequential(create_backbone("small_cnn", pretrained=False).module, torch.nn.Linear(192, 10))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4, foreach=True)
    aug = BatchAugment(28, *HALF, level="light", generator=torch.Generator().manual_seed(0))
    x, y, g = torch.from_numpy(train_x), torch.from_numpy(train_y), torch.Generator().manual_seed(0)
    for step in range(steps):
        for pg in opt.param_groups:  # cosine to 1e-5, as the trainer does
            pg["lr"] = 1e-5 + (lr - 1e-5) * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(net(aug(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    plain = BatchAugment(28, *HALF, level="none")
    with torch.no_grad():
        pred = np.concatenate([net(plain(torch.from_numpy(test_x[i:i + 1000]))).argmax(1).numpy()
                               for i in range(0, len(test_x), 1000)])
    return float((pred == test_y).mean())


def _ramp_compose(intensity, rgb, background, light, noise):
    """FMNIST-shop's tint with the texture kept: garment = a ramp from 0.4× the colour to 40 % towards white."""
    i = intensity.astype(np.float32)[..., None] / 255.0
    alpha = np.clip(i * 3.0, 0.0, 1.0)
    c = rgb[:, None, None, :] * light[:, None, None, None]
    dark, bright = 0.4 * c, c + 0.4 * (255.0 - c)
    out = background[:, None, None, None] * (1 - alpha) + (dark + (bright - dark) * i) * alpha + noise
    return np.clip(out, 0, 255).astype(np.uint8)


def _fixed_bg_compose(intensity, rgb, background, light, noise, _compose=shop_render._compose):
    return _compose(intensity, rgb, np.full_like(background, 130.0), light, noise)


def render(name: str, x, y, xt, yt, tax):
    """(train photos, train labels, test photos) of one variant."""
    if name == "grey":
        grey = lambda a: np.repeat(a[..., None], 3, axis=-1)  # noqa: E731
        return grey(x), y, grey(xt)
    if name == "colourways4":  # 4 colours per garment; the test set is the usual renders
        parts = [build_shop(x, y, tax, photos_per_item=1, seed=10 + k) for k in range(4)]
        return (np.concatenate([q.images for q in parts]), np.concatenate([q.category for q in parts]),
                build_shop(xt, yt, tax, photos_per_item=1, seed=2).images)
    compose = {"shop": shop_render._compose, "fixed-bg": _fixed_bg_compose, "ramp": _ramp_compose}[name]
    original, shop_render._compose = shop_render._compose, compose
    try:  # the variant renders test photos too: it is a different dataset
        return (build_shop(x, y, tax, photos_per_item=1, seed=0).images, y,
                build_shop(xt, yt, tax, photos_per_item=1, seed=2).images)
    finally:
        shop_render._compose = original


VARIANTS = ("grey", "shop", "fixed-bg", "ramp", "colourways4")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000, help="training steps of batch 64 per run (default: 5000)")
    p.add_argument("--items", type=int, default=25000, help="Fashion-MNIST train images used (default: 25000)")
    p.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--variants", default="grey,shop", help=f"comma-separated, from {', '.join(VARIANTS)} "
                   "(default: grey,shop)")
    args = p.parse_args()
    names = args.variants.split(",")
    if unknown := sorted(set(names) - set(VARIANTS)):
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    x, y = load_fashion_mnist(args.data_dir, "train")
    xt, yt = load_fashion_mnist(args.data_dir, "test")
    x, y = x[:args.items], y[:args.items]
    tax = load_taxonomy("fashion-mnist")
    results = {}
    for name in names:
        tx, ty, ex = render(name, x, y, xt, yt, tax)
        t0 = time.perf_counter()
        results[name] = train_and_test(tx, ty, ex, yt, args.steps)
        print(f"{name}: test top-1 {results[name]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "grey" in results:
        for name in (n for n in names if n != "grey"):
            print(f"{name} ÷ grey = {results[name] / results['grey']:.4f} ({args.steps} steps, {args.items} items)")


if __name__ == "__main__":
    main()
