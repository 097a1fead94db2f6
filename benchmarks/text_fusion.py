"""Does the listing's text help the image model? Image only, text only and fused, per group.

    python benchmarks/text_fusion.py                                  # newest quick model under /tmp/qs-run/models
    python benchmarks/text_fusion.py --model-dir DIR --items 10000 --quickstart-items 300

Two sets, both with titles and descriptions written from the truth with realistic noise
(training/fmnist_shop.py ``listing_texts``: 20 % missing, 8 % wrong category, 8 % colour word that disagrees
with the photo, 15 % French or German, 15 % no colour word, 10 % mentioning another item):
- FMNIST-shop test: Fashion-MNIST *test* items, one plain tinted photo each (``--items``);
- the quickstart catalogue (enrich/quickstart.py ``build_catalogue``: PNG files, two photos a listing, the
  seller's own tags), scored on the groups its sellers left out, as the quickstart fills them.

Per group (category, colour) and method:
- image: ``worker.tagging.decide`` on the listing without its text (the photos alone);
- text: the vocabulary match alone (model/text.py): the value the text names first is the prediction,
  further named values follow it; no match, no prediction;
- fused: ``decide`` on the listing with its text (the calibrated prior of worker/tagging.py).
Columns: coverage = share of items given a tag (image/fused: at or above the calibrated threshold; text:
named anything); precision = right tags / tags given; R@1 = right tags / all items; R@3 = the truth is among
the method's top 3 candidates (what the review queue shows; text: among the first three values named).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUPS = ("category", "colour")
METHODS = ("image", "text", "fused")


def _newest_model(root: Path) -> Path:
    found = sorted(root.glob("quickstart-*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no quickstart-* model under {root}: pass --model-dir, or train one with "
                         f"`enrich train --preset quick --out-dir {root}`")
    return found[-1].parent


def _ranked(event, taxonomy, model_version, cat, groups, manifest, default_threshold):
    """The tags decide() fills, and the top 3 of the probabilities it decides on (fused with the listing's
    text by the same functions decide() uses; the image alone when the event has no text)."""
    from worker.tagging import decide, fuse_text, text_matches

    real = decide(event, taxonomy, model_version, cat, groups, manifest.thresholds, manifest.label_thresholds,
                  default_threshold)
    text = text_matches(event, taxonomy)
    out = {}
    for g in GROUPS:
        values = taxonomy.category_names if g == "category" else taxonomy.group(g).values
        probs = np.asarray(cat if g == "category" else groups[g], dtype=np.float64)
        if text is not None and g in text.groups():
            probs = fuse_text(values, probs, text.found.get(g, {}), text.negated.get(g, {}))
        tag = real.tags.get(g)
        filled = tag.value if tag is not None and tag.source.value == "predicted" else None
        out[g] = (filled, [values[i] for i in np.argsort(-probs, kind="stable")[:3]])
    return out


def _text_ranked(event, vocab):
    from worker.tagging import text_of

    found = vocab.match(text_of(event)) if text_of(event) else None
    out = {}
    for g in GROUPS:
        named = [] if found is None else list(found.found.get(g, {}))  # in order of first mention
        out[g] = (named[0] if named else None, named[:3])
    return out


def evaluate(events, truth, scored, cat, groups, index, manifest, default_threshold, vocab):
    """events[i] with truth[i] ({group: value}); scored[i]: the groups to score; cat/groups[index[i]] its photos."""
    from worker.tagging import combine_images

    stats = {(g, m): np.zeros(4) for g in GROUPS for m in METHODS}  # n, tags, right tags, truth in top-3
    for ev, t, sc, rows in zip(events, truth, scored, index, strict=True):
        c, gp, _ = combine_images(cat[rows], {k: v[rows] for k, v in groups.items()},
                                  np.zeros((len(rows), 1), np.float32))
        silent = ev.model_copy(update={"title": "", "description": ""})
        res = {"image": _ranked(silent, manifest.taxonomy, manifest.model_version, c, gp, manifest, default_threshold),
               "fused": _ranked(ev, manifest.taxonomy, manifest.model_version, c, gp, manifest, default_threshold),
               "text": _text_ranked(ev, vocab)}
        for m, per_group in res.items():
            for g in sc:
                filled, top3 = per_group[g]
                stats[(g, m)] += [1, filled is not None, filled == t[g], t[g] in top3]
    return stats


def shop_set(model_dir: Path, fmnist_dir: Path, items: int, seed: int):
    from model.inference import load_predictor
    from schemas.events import ListingEvent
    from training.fmnist import load_fashion_mnist
    from training.fmnist_shop import build_shop, listing_texts

    predictor = load_predictor(model_dir, device="cpu")
    tax = predictor.taxonomy
    x, y = load_fashion_mnist(fmnist_dir, "test")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(x), size=min(items, len(x)), replace=False))
    shop = build_shop(x[pick], y[pick], tax, photos_per_item=1, seed=seed)
    texts = listing_texts(shop.category, shop.colour, tax, seed=seed)
    import torch
    from PIL import Image

    cats, grps = [], {}
    for a in range(0, len(shop), 1024):
        batch = torch.stack([predictor.preprocess(Image.fromarray(im)) for im in shop.images[a:a + 1024]])
        p = predictor.predict(batch)
        cats.append(p.category)
        for k, v in p.groups.items():
            grps.setdefault(k, []).append(v)
    cat = np.concatenate(cats)
    groups = {k: np.concatenate(v) for k, v in grps.items()}
    colours = tax.group("colour").values
    events = [ListingEvent(listing_id=f"shop-{i}", seller_id="s", title=t.title, description=t.description,
                           images=[f"shop-{i}.png"]) for i, t in enumerate(texts)]
    truth = [{"category": tax.categories[int(c)].name, "colour": colours[int(k)]}
             for c, k in zip(shop.category, shop.colour, strict=True)]
    index = [np.array([i]) for i in range(len(events))]
    return predictor, events, truth, [GROUPS] * len(events), cat, groups, index, texts


def quickstart_set(predictor, fmnist_dir: Path, items: int, work: Path):
    from PIL import Image

    from enrich.quickstart import build_catalogue
    from worker.batch import read_listings

    catalogue = build_catalogue(work, fmnist_dir, items=items)
    events, invalid, _ = read_listings(catalogue.listings)
    assert not invalid, invalid
    images, index = [], []
    for ev in events:
        index.append(np.arange(len(images), len(images) + len(ev.images)))
        for uri in ev.images:
            with Image.open(uri) as im:
                images.append(predictor.preprocess(im.convert("RGB")))
    import torch

    p = predictor.predict(torch.stack(images))
    truth = [catalogue.truth[ev.listing_id] for ev in events]
    scored = [tuple(g for g in GROUPS if g in catalogue.hidden[ev.listing_id]) for ev in events]
    return events, truth, scored, p.category, p.groups, index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="default: newest /tmp/qs-run/models/quickstart-*")
    ap.add_argument("--fmnist-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--items", type=int, default=10000, help="FMNIST-shop test items (default: all 10 000)")
    ap.add_argument("--quickstart-items", type=int, default=300, help="quickstart catalogue size (its default)")
    ap.add_argument("--seed", type=int, default=23)
    args = ap.parse_args()

    import torch

    from core.config import Settings
    from model.text import load_vocabulary

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    model_dir = args.model_dir or _newest_model(Path("/tmp/qs-run/models"))
    default_threshold = Settings().default_threshold
    predictor, events, truth, scored, cat, groups, index, texts = shop_set(model_dir, args.fmnist_dir, args.items,
                                                                            args.seed)
    vocab = load_vocabulary(predictor.taxonomy)
    m = predictor.manifest
    rows = [("FMNIST-shop test", evaluate(events, truth, scored, cat, groups, index, m, default_threshold, vocab),
             len(events))]
    with tempfile.TemporaryDirectory() as tmp:
        qs = quickstart_set(predictor, args.fmnist_dir, args.quickstart_items, Path(tmp))
        rows.append(("quickstart (left-out tags)", evaluate(*qs, m, default_threshold, vocab), len(qs[0])))

    missing = sum(t.missing for t in texts) / len(texts)
    print(f"model {m.model_version} ({m.backbone}, {m.image_size}px) from {model_dir}; text noise on FMNIST-shop: "
          f"{missing:.0%} missing, {sum(t.language != 'en' and not t.missing for t in texts) / len(texts):.0%} fr/de")
    print(f"{'set':28s} {'group':9s} {'method':6s} {'n':>6s} {'coverage':>9s} {'precision':>10s} "
          f"{'R@1':>7s} {'R@3':>7s}")
    for name, stats, _ in rows:
        for g in GROUPS:
            for meth in METHODS:
                n, tags, right, top3 = stats[(g, meth)]
                prec = right / tags if tags else float("nan")
                print(f"{name:28s} {g:9s} {meth:6s} {int(n):6d} {tags / n:9.1%} {prec:10.1%} {right / n:7.1%} "
                      f"{top3 / n:7.1%}")
    print(f"({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
