import colorsys

import numpy as np

from training.fmnist import load_fashion_mnist
from training.fmnist_shop import COLOUR_RGB, build_shop


def _hue(rgb):
    return colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255.0))[0]


def test_shop_photos_items_and_split(fmnist_dir, fmnist_taxonomy):
    x, y = load_fashion_mnist(fmnist_dir, "test")
    shop = build_shop(x[:50], y[:50], fmnist_taxonomy, photos_per_item=3, seed=1)
    assert shop.images.shape == (150, 28, 28, 3) and shop.images.dtype == np.uint8
    assert shop.item_ids.tolist() == np.repeat(np.arange(50), 3).tolist()
    assert shop.category.tolist() == np.repeat(y[:50], 3).tolist()
    # each item: one query, the rest gallery; every photo of an item has the item's colour
    assert shop.is_query.reshape(50, 3).sum(axis=1).tolist() == [1] * 50
    assert (shop.colour.reshape(50, 3) == shop.colour[::3, None]).all()
    assert len(np.unique(shop.colour)) >= 5
    # photos of one item differ (augmented), but not the item identity
    assert not np.array_equal(shop.images[1], shop.images[2])


def test_tint_is_on_the_garment(fmnist_dir, fmnist_taxonomy):
    x, y = load_fashion_mnist(fmnist_dir, "test")
    values = fmnist_taxonomy.group("colour").values
    red = values.index("red")
    shop = build_shop(x[:5], y[:5], fmnist_taxonomy, photos_per_item=1, colours=np.full(5, red))
    for img, src in zip(shop.images, x[:5], strict=True):
        garment = img[src > 200].astype(float).mean(axis=0)
        background = img[src == 0].astype(float)
        assert garment[0] > garment[1] + 80 and garment[0] > garment[2] + 80  # red
        # the background stays neutral grey
        assert np.abs(background[:, 0] - background[:, 1]).mean() < 6


def test_same_seed_same_shop(fmnist_dir, fmnist_taxonomy):
    x, y = load_fashion_mnist(fmnist_dir, "test")
    a = build_shop(x[:10], y[:10], fmnist_taxonomy, photos_per_item=2, seed=3)
    b = build_shop(x[:10], y[:10], fmnist_taxonomy, photos_per_item=2, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert set(fmnist_taxonomy.group("colour").values) <= set(COLOUR_RGB)


def test_grey_photos_are_the_published_images(fmnist_dir, fmnist_taxonomy):
    from training.fmnist_shop import grey_photos
    from training.losses import MISSING

    x, y = load_fashion_mnist(fmnist_dir, "test")
    grey = grey_photos(x[:20], y[:20])
    assert grey.images.shape == (20, 28, 28, 3)
    assert all(np.array_equal(grey.images[..., c], x[:20]) for c in range(3))  # untouched, untinted
    assert grey.category.tolist() == y[:20].tolist()
    # category only: colour unknown (no loss), not a shop photo (no triplets, no query)
    assert (grey.colour == MISSING).all() and (grey.item_ids == MISSING).all() and not grey.is_query.any()


def test_grey_repeats_raise_the_grey_share_only(fmnist_dir, fmnist_taxonomy):
    from training.config import TrainConfig
    from training.losses import MISSING
    from training.prepare import prepare_fmnist_shop

    def grey_rows(repeats: int):
        cfg = TrainConfig(data_dir=fmnist_dir, train_items=30, val_items=10, test_items=10, photos_per_item=2,
                          grey_photos=True, grey_repeats=repeats)
        train = prepare_fmnist_shop(cfg, fmnist_taxonomy).train
        return train, train.item_ids == MISSING

    once, grey1 = grey_rows(1)
    thrice, grey3 = grey_rows(3)
    assert grey1.sum() == 30 and grey3.sum() == 90  # 30 items: one grey photo each, counted 1× / 3×
    # the shop photos are the same; the grey photo of each item appears three times, labels kept
    assert np.array_equal(once.images[~grey1], thrice.images[~grey3])
    g1, g3 = once.subset(np.flatnonzero(grey1)), thrice.subset(np.flatnonzero(grey3))
    assert np.array_equal(np.tile(g1.images, (3, 1, 1, 1)), g3.images)
    assert np.tile(g1.category, 3).tolist() == g3.category.tolist()


# --- listing text ----------------------------------------------------------------------------------------

def _truths(n: int, fmnist_taxonomy, seed: int = 0):
    rng = np.random.default_rng(seed)
    colours = len(fmnist_taxonomy.group("colour").values)
    return rng.integers(0, len(fmnist_taxonomy.categories), n), rng.integers(0, colours, n)


def test_listing_texts_are_deterministic_per_seed(fmnist_taxonomy):
    from training.fmnist_shop import listing_texts

    cat, col = _truths(300, fmnist_taxonomy)
    a = listing_texts(cat, col, fmnist_taxonomy, seed=5)
    assert a == listing_texts(cat, col, fmnist_taxonomy, seed=5)
    assert a != listing_texts(cat, col, fmnist_taxonomy, seed=6)
    assert len(a) == 300 and len({t.title for t in a}) > 100  # varied, not one template


def test_listing_text_noise_shares_are_within_tolerance(fmnist_taxonomy):
    from training.fmnist_shop import TextNoise, listing_texts

    noise = TextNoise()
    cat, col = _truths(4000, fmnist_taxonomy, seed=1)
    texts = listing_texts(cat, col, fmnist_taxonomy, seed=2, noise=noise)
    names, colours = fmnist_taxonomy.category_names, fmnist_taxonomy.group("colour").values
    present = [(t, c, k) for t, c, k in zip(texts, cat, col, strict=True) if not t.missing]
    n = len(present)
    assert abs(1 - n / 4000 - noise.missing) < 0.025
    assert abs(sum(t.category != names[c] for t, c, _ in present) / n - noise.wrong_category) < 0.02
    named_colour = [(t, k) for t, _, k in present if t.colour is not None]
    assert abs(1 - len(named_colour) / n - noise.no_colour) < 0.025
    assert abs(sum(t.colour != colours[k] for t, k in named_colour) / len(named_colour) - noise.wrong_colour) < 0.02
    foreign = [t.language for t, _, _ in present if t.language != "en"]
    assert abs(len(foreign) / n - noise.foreign) < 0.025 and {"fr", "de"} == set(foreign)
    assert abs(sum(t.distractor is not None for t, _, _ in present) / n - noise.distractor) < 0.02
    assert all(t.title == "" and t.description == "" and t.category is None for t in texts if t.missing)


def test_clean_listing_text_is_understood_by_the_matcher(fmnist_taxonomy):
    """Every clean text (any language, no distractor) names exactly its truth for model/text.py."""
    from model.text import load_vocabulary
    from training.fmnist_shop import listing_texts

    vocab = load_vocabulary(fmnist_taxonomy)
    cat, col = _truths(1500, fmnist_taxonomy, seed=3)
    texts = listing_texts(cat, col, fmnist_taxonomy, seed=4)
    names, colours = fmnist_taxonomy.category_names, fmnist_taxonomy.group("colour").values
    clean = [(t, names[c], colours[k]) for t, c, k in zip(texts, cat, col, strict=True)
             if not t.missing and t.distractor is None and t.category == names[c] and t.colour == colours[k]]
    assert len(clean) > 700 and {t.language for t, _, _ in clean} == {"en", "fr", "de"}
    for t, category, colour in clean:
        found = vocab.match(t.title + "\n" + t.description)
        assert set(found.found.get("category", {})) == {category}, t
        assert set(found.found.get("colour", {})) == {colour}, t
        assert not found.negated, t
    # the noisy ones say what their record says they say (a wrong value is named, a missing one is not)
    for t in texts:
        found = vocab.match(t.title + "\n" + t.description)
        if t.missing:
            assert not found
        elif t.distractor is None:
            assert set(found.found.get("category", {})) == {t.category}, t
            assert set(found.found.get("colour", {})) == ({t.colour} if t.colour else set()), t


def test_shop_texts_one_per_item_and_builder_unchanged(fmnist_dir, fmnist_taxonomy):
    from training.fmnist_shop import shop_texts

    x, y = load_fashion_mnist(fmnist_dir, "test")
    shop = build_shop(x[:40], y[:40], fmnist_taxonomy, photos_per_item=2, seed=3)
    again = build_shop(x[:40], y[:40], fmnist_taxonomy, photos_per_item=2, seed=3)
    texts = shop_texts(shop, fmnist_taxonomy, seed=3)
    assert sorted(texts) == list(range(40))
    np.testing.assert_array_equal(shop.images, again.images)  # the text draws its own randomness
    assert any(t.title for t in texts.values())
