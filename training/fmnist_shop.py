"""FMNIST-shop: Fashion-MNIST garments as shop items with several colour-tinted "photos" each.

Each source image is an *item* with a category (its Fashion-MNIST label) and a colour from the
taxonomy's ``colour`` group. The tint is applied to the garment only (the image intensity is the
garment's alpha), over a neutral grey background. Each item gets ``photos_per_item`` photos under
small random geometric and lighting changes, so retrieval is "find the other photos of this item",
as in DeepFashion In-shop; the first ``query_per_item`` photos of an item are queries, the rest gallery.

``grey_photos`` gives the Fashion-MNIST images as published (light garment on black, no tint): the
images published Fashion-MNIST figures are measured on; category only (colour and item masked).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.text import vocabulary_path
from schemas.taxonomy import CATEGORY_GROUP, COLOUR_GROUP, Taxonomy
from training.losses import MISSING

# sRGB of the colour names the fashion-mnist taxonomy uses
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25), "white": (245, 245, 245), "red": (215, 30, 35), "green": (35, 160, 60),
    "blue": (35, 70, 210), "yellow": (240, 215, 40), "purple": (130, 45, 160), "orange": (245, 130, 20),
    "grey": (128, 128, 128), "brown": (120, 70, 30), "pink": (240, 140, 180), "beige": (220, 200, 160),
}


@dataclass
class ShopSet:
    images: np.ndarray  # (N, H, W, 3) uint8 photos
    item_ids: np.ndarray  # (N,) int64: the source image index (MISSING: not a shop photo)
    category: np.ndarray  # (N,) int64: index into taxonomy.categories
    colour: np.ndarray  # (N,) int64: index into the taxonomy's colour group values, or MISSING
    is_query: np.ndarray  # (N,) bool: query photo (else gallery)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> ShopSet:
        return ShopSet(self.images[idx], self.item_ids[idx], self.category[idx], self.colour[idx], self.is_query[idx])


def _geometry(garments: np.ndarray, rng: np.random.Generator, augmented: np.ndarray, size: int) -> np.ndarray:
    """Intensity maps (B, size, size): augmented photos get a small rotation (±8°), scale (0.9–1.08) and
    shift (±2 px) — one batched affine warp; plain photos are the garment itself."""
    b = len(garments)
    angle = np.deg2rad(rng.uniform(-8, 8, size=b)) * augmented
    scale = np.where(augmented, rng.uniform(0.9, 1.08, size=b), 1.0)
    shift = rng.uniform(-2, 2, size=(b, 2)) * augmented[:, None] * (2 / 28)  # pixels → normalised coords
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta = np.stack([np.stack([cos, -sin, -shift[:, 0]], 1), np.stack([sin, cos, -shift[:, 1]], 1)], 1)
    x = torch.from_numpy(np.ascontiguousarray(garments)).float()[:, None] / 255.0
    grid = F.affine_grid(torch.from_numpy(theta).float(), [b, 1, 28, 28], align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = torch.where(torch.from_numpy(augmented)[:, None, None, None], warped, x)  # plain: untouched
    if size != 28:
        warped = F.interpolate(warped, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (warped[:, 0] * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def _compose(intensity: np.ndarray, rgb: np.ndarray, background: np.ndarray, light: np.ndarray,
             noise: np.ndarray) -> np.ndarray:
    """Vectorised tint: (B, S, S) intensities → (B, S, S, 3) uint8 photos."""
    i = intensity.astype(np.float32)[..., None] / 255.0
    # the garment is opaque wherever it exists (dim Fashion-MNIST garments would otherwise show the
    # background through and lose their colour); its intensity survives as shading, i.e. texture;
    # additive shading keeps that texture visible on black and white garments alike
    alpha = np.clip(i * 3.0, 0.0, 1.0)
    shade = np.clip(rgb[:, None, None, :] * light[:, None, None, None] + (i - 0.6) * 100.0, 0, 255)
    out = background[:, None, None, None] * (1 - alpha) + shade * alpha + noise
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
    total = n * photos_per_item
    augmented = np.tile(np.arange(photos_per_item) > 0, n)  # photo 0 of each item is the plain rendering
    garments = np.asarray(images, dtype=np.uint8).repeat(photos_per_item, axis=0)
    background = rng.uniform(95, 165, size=total).astype(np.float32)  # neutral grey: black and white stand out
    light = np.where(augmented, rng.uniform(0.9, 1.1, size=total), 1.0).astype(np.float32)
    rgb = palette[colours.repeat(photos_per_item)]
    out = np.empty((total, size, size, 3), dtype=np.uint8)
    for a in range(0, total, 4096):
        b = min(total, a + 4096)
        noise = np.zeros((b - a, size, size, 3), dtype=np.float32)
        aug = augmented[a:b]
        noise[aug] = rng.standard_normal((int(aug.sum()), size, size, 3), dtype=np.float32) * 3.0  # sensor noise
        intensity = _geometry(garments[a:b], rng, augmented[a:b], size)
        out[a:b] = _compose(intensity, rgb[a:b], background[a:b], light[a:b], noise)
    item_ids = np.repeat(np.arange(n, dtype=np.int64), photos_per_item)
    is_query = np.tile(np.arange(photos_per_item) < query_per_item, n)
    return ShopSet(images=out, item_ids=item_ids, category=np.asarray(labels, dtype=np.int64).repeat(photos_per_item),
                   colour=colours.repeat(photos_per_item), is_query=is_query)


def grey_photos(images: np.ndarray, labels: np.ndarray) -> ShopSet:
    """Each Fashion-MNIST image as published, as an RGB photo with its category only: colour MISSING (a
    grey photo does not show it) and no item id — not a shop photo, so retrieval neither trains nor
    tests on it (with an item id, the grey photo would be each item's hardest positive and teach the
    embedding to drop colour)."""
    if len(images) != len(labels):
        raise ValueError("images and labels differ in length")
    n = len(images)
    return ShopSet(images=np.repeat(np.asarray(images, dtype=np.uint8)[..., None], 3, axis=-1),
                   item_ids=np.full(n, MISSING, np.int64), category=np.asarray(labels, dtype=np.int64).copy(),
                   colour=np.full(n, MISSING, np.int64), is_query=np.zeros(n, bool))


# --- listing text: titles and descriptions written from the truth, with realistic noise -----------

TEXT_LANGUAGES = ("en", "fr", "de")
_BRANDS = ("Zara", "Mango", "Uniqlo", "H&M", "Vinted find", "Vintage", "Handmade", "Basic")
_SIZES = ("XS", "S", "M", "L", "XL", "36", "38", "40", "42")
_TITLE: dict[str, tuple[str, ...]] = {
    "en": ("{Colour} {cat}", "{brand} {colour} {cat}", "{Colour} {cat}, size {size}", "{Cat} in {colour}"),
    "fr": ("{Cat} {colour}", "{brand} {cat} {colour}", "{Cat} {colour}, taille {size}"),
    "de": ("{Cat} in {colour}", "{brand} {cat} in {colour}", "{Cat} {colour}, Größe {size}"),
}
_TITLE_NO_COLOUR: dict[str, tuple[str, ...]] = {"en": ("{Cat}", "{brand} {cat}", "{Cat}, size {size}"),
                    "fr": ("{Cat}", "{brand} {cat}", "{Cat}, taille {size}"),
                    "de": ("{Cat}", "{brand} {cat}", "{Cat}, Größe {size}")}
_DESCRIPTION = {
    "en": ("Worn a few times, very good condition. Size {size}.", "Like new. Size {size}. Smoke-free home.",
           "Good condition, small mark inside. Size {size}."),
    "fr": ("Très bon état. Taille {size}.", "Porté quelques fois. Taille {size}."),
    "de": ("Sehr guter Zustand. Größe {size}.", "Wenig getragen. Größe {size}."),
}
_DISTRACTOR = {"en": "Goes well with {colour} {cat}.", "fr": "Se porte avec {cat} {colour}.",
               "de": "Passt zu {cat} in {colour}."}


@dataclass(frozen=True)
class TextNoise:
    """Shares of the noise in generated listing text. ``missing`` is a share of all items; the others are
    shares of the items that have text, drawn independently of each other."""
    missing: float = 0.20  # no title and no description at all
    wrong_category: float = 0.08  # the text names another category (the seller's mistake)
    wrong_colour: float = 0.08  # the colour word disagrees with the photo ("navy" for a purple item)
    foreign: float = 0.15  # French or German (half each), words from the vocabulary
    no_colour: float = 0.15  # the title names the category only
    distractor: float = 0.10  # the description mentions another item ("goes well with black jeans")


@dataclass(frozen=True)
class ListingText:
    title: str
    description: str
    language: str  # "en", "fr", "de"; "" when missing
    category: str | None  # the category the text names (right or wrong); None: names none
    colour: str | None  # the colour it names (right or wrong); None: names none
    distractor: tuple[str, str] | None = None  # (category, colour) of another item the description mentions

    @property
    def missing(self) -> bool:
        return not self.title and not self.description


def _vocab_words(taxonomy: Taxonomy) -> dict[str, dict[str, dict[str, list[str]]]]:
    """group → value → language → phrases, from the vocabulary file beside the taxonomy."""
    path = vocabulary_path(taxonomy.name)
    if not path.is_file():
        raise ValueError(f"taxonomy {taxonomy.name!r} has no vocabulary file ({path}) to write listing text from")
    groups = json.loads(path.read_text())["groups"]
    return {g: {v: (p if isinstance(p, dict) else {"en": list(p)}) for v, p in values.items()}
            for g, values in groups.items()}


def _phrase(words: dict[str, list[str]], lang: str, rng: np.random.Generator) -> str:
    options = words.get(lang) or words.get("en") or next(iter(words.values()))
    return str(options[int(rng.integers(len(options)))])


def listing_texts(category: np.ndarray, colour: np.ndarray, taxonomy: Taxonomy, seed: int = 0,
                  noise: TextNoise = TextNoise()) -> list[ListingText]:
    """One title and description per item from its truth (category index, colour index), with seeded noise.

    An optional extra output of FMNIST-shop (``build_shop`` is unchanged, so training is unaffected): pass
    ``shop.category[shop.item_ids == i][0]``-style per-item truths, or :func:`shop_texts`. Words come from the
    taxonomy's vocabulary (model/text.py), so a clean text names exactly its truth; a wrong category is a
    sibling of the same type half the time (a shirt sold as a top), any other category otherwise.
    """
    category = np.asarray(category, dtype=np.int64)
    colour = np.asarray(colour, dtype=np.int64)
    if len(category) != len(colour):
        raise ValueError("category and colour differ in length")
    vocab = _vocab_words(taxonomy)
    cats = taxonomy.category_names
    colours = taxonomy.group(COLOUR_GROUP).values
    rng = np.random.default_rng([seed, 23])  # its own stream: never shifts the photos' randomness
    out: list[ListingText] = []
    for c, k in zip(category.tolist(), colour.tolist(), strict=True):
        u = rng.random(7)
        lang_pick = rng.random()
        brand, size = _BRANDS[int(rng.integers(len(_BRANDS)))], _SIZES[int(rng.integers(len(_SIZES)))]
        if u[0] < noise.missing:
            out.append(ListingText("", "", "", None, None))
            continue
        lang = ("fr" if lang_pick < 0.5 else "de") if u[1] < noise.foreign else "en"
        cat = cats[c]
        if u[2] < noise.wrong_category:
            siblings = [n for n in cats if n != cat and taxonomy.type_of(n) == taxonomy.type_of(cat)]
            pool = siblings if siblings and rng.random() < 0.5 else [n for n in cats if n != cat]
            cat = pool[int(rng.integers(len(pool)))]
        col: str | None = colours[k] if 0 <= k < len(colours) else None
        if col is not None and u[3] < noise.wrong_colour:
            others = [v for v in colours if v != col]
            col = others[int(rng.integers(len(others)))]
        if u[4] < noise.no_colour:
            col = None
        cat_words = _phrase(vocab[CATEGORY_GROUP][cat], lang, rng)
        fields = {"cat": cat_words, "Cat": cat_words[:1].upper() + cat_words[1:], "brand": brand, "size": size}
        if col is None:
            templates = _TITLE_NO_COLOUR[lang]
        else:
            col_words = _phrase(vocab[COLOUR_GROUP][col], lang, rng)
            fields.update(colour=col_words, Colour=col_words[:1].upper() + col_words[1:])
            templates = _TITLE[lang]
        title = templates[int(rng.integers(len(templates)))].format(**fields)
        description = _DESCRIPTION[lang][int(rng.integers(len(_DESCRIPTION[lang])))].format(size=size)
        distractor = None
        if u[5] < noise.distractor:
            other_cat = cats[int(rng.integers(len(cats)))]
            other_col = colours[int(rng.integers(len(colours)))]
            distractor = (other_cat, other_col)
            description += " " + _DISTRACTOR[lang].format(cat=_phrase(vocab[CATEGORY_GROUP][other_cat], lang, rng),
                                                          colour=_phrase(vocab[COLOUR_GROUP][other_col], lang, rng))
        out.append(ListingText(title, description, lang, cat, col, distractor))
    return out


def shop_texts(shop: ShopSet, taxonomy: Taxonomy, seed: int = 0, noise: TextNoise = TextNoise()
               ) -> dict[int, ListingText]:
    """:func:`listing_texts` for every item of a shop (item id → its text); grey photos have none."""
    ids, first = np.unique(shop.item_ids[shop.item_ids != MISSING], return_index=True)
    rows = np.flatnonzero(shop.item_ids != MISSING)[first]
    texts = listing_texts(shop.category[rows], shop.colour[rows], taxonomy, seed=seed, noise=noise)
    return dict(zip(ids.tolist(), texts, strict=True))
