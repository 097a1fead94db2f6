"""FMNIST-shop: Fashion-MNIST garments as shop items with several colour-tinted "photos" each.

Each source image is an *item* with a category (its Fashion-MNIST label) and a colour from the
taxonomy's ``colour`` group. The tint is applied to the garment only (the image intensity is the
garment's alpha), over a neutral grey background. Each item gets ``photos_per_item`` photos under
small random geometric and lighting changes, so retrieval is "find the other photos of this item",
as in DeepFashion In-shop; the first ``query_per_item`` photos of an item are queries, the rest gallery.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from schemas.taxonomy import Taxonomy

# sRGB of the colour names the fashion-mnist taxonomy uses
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25), "white": (245, 245, 245), "red": (215, 30, 35), "green": (35, 160, 60),
    "blue": (35, 70, 210), "yellow": (240, 215, 40), "purple": (130, 45, 160), "orange": (245, 130, 20),
    "grey": (128, 128, 128), "brown": (120, 70, 30), "pink": (240, 140, 180), "beige": (220, 200, 160),
}
COLOUR_GROUP = "colour"


@dataclass
class ShopSet:
    images: np.ndarray  # (N, H, W, 3) uint8 photos
    item_ids: np.ndarray  # (N,) int64: the source image index
    category: np.ndarray  # (N,) int64: index into taxonomy.categories
    colour: np.ndarray  # (N,) int64: index into the taxonomy's colour group values
    is_query: np.ndarray  # (N,) bool: query photo (else gallery)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> "ShopSet":
        return ShopSet(self.images[idx], self.item_ids[idx], self.category[idx], self.colour[idx], self.is_query[idx])


def _render(garment: np.ndarray, rgb: np.ndarray, background: float, rng: np.random.Generator,
            augment: bool, size: int) -> np.ndarray:
    img = Image.fromarray(garment)
    if augment:  # a different "photo" of the same item: small shift, scale, rotation
        angle = rng.uniform(-8, 8)
        scale = rng.uniform(0.9, 1.08)
        dx, dy = rng.uniform(-2, 2, size=2)
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(dx, dy))
        if abs(scale - 1) > 1e-3:
            s = max(8, int(round(28 * scale)))
            scaled = img.resize((s, s), Image.Resampling.BILINEAR)
            canvas = Image.new("L", (28, 28))
            off = (28 - s) // 2
            canvas.paste(scaled, (off, off)) if s <= 28 else canvas.paste(scaled.crop((-off, -off, -off + 28, -off + 28)))
            img = canvas
    if size != 28:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    intensity = np.asarray(img, dtype=np.float32)[..., None] / 255.0
    # the garment is opaque wherever it exists (dim Fashion-MNIST garments would otherwise show the
    # background through and lose their colour); its intensity survives as shading, i.e. texture
    alpha = np.clip(intensity * 3.0, 0.0, 1.0)
    light = rng.uniform(0.9, 1.1) if augment else 1.0
    # additive shading keeps texture visible on black and white garments alike
    shade = np.clip(rgb[None, None, :] * light + (intensity - 0.6) * 100.0, 0, 255)
    out = background * (1 - alpha) + shade * alpha
    if augment:
        out = out + rng.normal(0, 3.0, size=out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def build_shop(images: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy, photos_per_item: int = 4,
               seed: int = 0, query_per_item: int = 1, size: int = 28,
               colours: np.ndarray | None = None) -> ShopSet:
    """Items = Fashion-MNIST images; returns ``len(images) * photos_per_item`` photos.

    The first photo of each item is the plain rendering (no geometric change), so a one-photo shop of
    the test split is Fashion-MNIST test with a colour tint. ``colours`` fixes each item's colour index.
    """
    if len(images) != len(labels):
        raise ValueError("images and labels differ in length")
    if photos_per_item < 1 or not 0 <= query_per_item <= photos_per_item:
        raise ValueError("need photos_per_item >= 1 and 0 <= query_per_item <= photos_per_item")
    values = taxonomy.group(COLOUR_GROUP).values
    unknown = [v for v in values if v not in COLOUR_RGB]
    if unknown:
        raise ValueError(f"no RGB for colours {unknown}; known: {sorted(COLOUR_RGB)}")
    palette = np.array([COLOUR_RGB[v] for v in values], dtype=np.float32)
    rng = np.random.default_rng(seed)
    n = len(images)
    if colours is None:
        colours = rng.integers(0, len(values), size=n)
    colours = np.asarray(colours, dtype=np.int64)
    out = np.empty((n * photos_per_item, size, size, 3), dtype=np.uint8)
    for i in range(n):
        for j in range(photos_per_item):
            background = rng.uniform(95, 165)  # neutral grey: black and white garments both stand out
            out[i * photos_per_item + j] = _render(images[i], palette[colours[i]], background, rng,
                                                   augment=j > 0, size=size)
    item_ids = np.repeat(np.arange(n, dtype=np.int64), photos_per_item)
    is_query = np.tile(np.arange(photos_per_item) < query_per_item, n)
    return ShopSet(images=out, item_ids=item_ids, category=np.asarray(labels, dtype=np.int64).repeat(photos_per_item),
                   colour=colours.repeat(photos_per_item), is_query=is_query)
