"""Similar-items shelves: do they stay in the category, and is "this one in another colour" found?

    python benchmarks/shelf_quality.py --model-dir DIR                    # a trained fashion-mnist model
    python benchmarks/shelf_quality.py --model-dir DIR --weights 0,0.1,0.2,0.3,0.5 --colourways 1000

One model, one run, three sets:
- FMNIST-shop test (the training run's evaluation set: Fashion-MNIST test items, a query photo and a gallery
  photo each): item R@1 (the other photo of the same item ranks first) and same-category precision@5 of the
  gallery's top 5, per shelf category weight w (model/inference.py ``shelf_embedding``: the one-hot of the
  predicted category; w = 0 is the image embedding alone, without the category), and with the
  category probabilities in place of the one-hot ("soft", the alternative);
- the quickstart catalogue (enrich/quickstart.py ``build_catalogue``: 300 listings, two PNG photos each,
  combined per listing as the worker does): same-category precision@5 of each listing's shelf among the
  other listings, per w; the sellers' categories (a third of the listings) count, as in the worker;
- colourways: ``--colourways`` Fashion-MNIST test garments, each rendered in three different colours, one
  listing per (garment, colour). For every listing, "other colours" ranks the listings whose predicted colour
  differs, and a hit is the same garment among the top 5. Per colour-free rule: the embedding as it is, or
  with the colour dimensions of the model's colour condition mask taken out (``similar.query.colour_free``).
Prints tables and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


N_CATEGORIES = 10  # the fashion-mnist taxonomy


def _shelf(emb: np.ndarray, probs: np.ndarray, w: float, known: np.ndarray | None = None,
           soft: bool = False) -> np.ndarray:
    """Shelf vectors as the worker stores them: the one-hot of the known category (``known`` ≥ 0: the
    seller's) else of the most likely one. ``soft``: the alternative measured beside it, the category
    probabilities (L2-normalised) in place of the one-hot."""
    from model.inference import shelf_embedding

    if soft:
        cat = probs.copy()
        if known is not None:
            cat[known >= 0] = np.eye(N_CATEGORIES)[known[known >= 0]]
        q = cat / np.linalg.norm(cat, axis=1, keepdims=True)
        return np.concatenate([emb * (1 - w) ** 0.5, q * w ** 0.5], axis=1).astype(np.float32)
    index = probs.argmax(1) if known is None else np.where(known >= 0, known, probs.argmax(1))
    return shelf_embedding(emb, index, N_CATEGORIES, w)


def _topk_others(vectors: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """(N, k) indices of each row's nearest other rows by inner product (``allowed``: (N, N) bool)."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    if allowed is not None:
        sims = np.where(allowed, sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def fmnist_shop(predictor, fmnist_dir: Path, weights: list[float]) -> dict[str, dict[str, float]]:
    from dataclasses import replace

    import torch

    from training.config import QUICK
    from training.evaluate import predict_dataset
    from training.metrics import retrieval_metrics
    from training.prepare import fmnist_shop_test

    split, _, _ = fmnist_shop_test(replace(QUICK, data_dir=fmnist_dir), predictor.taxonomy)
    preds = predict_dataset(predictor.model, split.data, predictor.manifest.image_size, torch.device("cpu"))
    q, ids, cats = split.query, split.data.item_ids, split.data.category
    out = {}
    for w, soft in [(w, False) for w in weights] + [(w, True) for w in weights if w > 0]:
        e = _shelf(preds.embedding, preds.category, w, soft=soft)
        m = retrieval_metrics(e[q], ids[q], e[~q], ids[~q], ks=(1, 5), query_category=cats[q],
                              gallery_category=cats[~q])
        out[f"{w}{' soft' if soft else ''}"] = {"R@1": m["recall@1"], "category_P@5": m["category_precision@5"]}
    return out


def quickstart(predictor, fmnist_dir: Path, weights: list[float], items: int) -> dict[str, dict[str, float]]:
    from PIL import Image

    from enrich.quickstart import build_catalogue
    from schemas.events import ListingEvent

    names = predictor.taxonomy.category_names
    with tempfile.TemporaryDirectory() as tmp:
        cat = build_catalogue(Path(tmp), fmnist_dir, items=items)
        events = [ListingEvent.model_validate_json(line) for line in cat.listings.read_text().splitlines()]
        truth = np.array([names.index(cat.truth[e.listing_id]["category"]) for e in events])
        preds = [predictor.predict_images([Image.open(Path(tmp) / p).convert("RGB") for p in e.images])
                 for e in events]
    # the worker: the photos of a listing combined (mean probabilities, mean embedding re-normalised)
    emb = np.stack([p.embedding.mean(axis=0) for p in preds])
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    probs = np.stack([p.category.mean(axis=0) for p in preds])
    seller = np.array([names.index(e.category) if e.category else -1 for e in events])
    out = {}
    for w, soft in [(w, False) for w in weights] + [(w, True) for w in weights if w > 0]:
        top = _topk_others(_shelf(emb, probs, w, seller, soft), 5)
        out[f"{w}{' soft' if soft else ''}"] = {"category_P@5": float((truth[top] == truth[:, None]).mean())}
    return out


def colourways(predictor, fmnist_dir: Path, garments: int, w: float, seed: int = 11) -> dict[str, dict]:
    import torch

    from similar.query import COLOUR_FREE_RULES, colour_free
    from training.data import from_shop
    from training.evaluate import predict_dataset
    from training.fmnist import load_fashion_mnist
    from training.fmnist_shop import COLOUR_GROUP, build_shop

    taxonomy = predictor.taxonomy
    x, y = load_fashion_mnist(fmnist_dir, "test")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(x), size=garments, replace=False)
    n_colours = len(taxonomy.group(COLOUR_GROUP).values)
    ways = np.stack([rng.choice(n_colours, size=3, replace=False) for _ in range(garments)])  # (G, 3)
    shops = [build_shop(x[pick], y[pick], taxonomy, photos_per_item=1, seed=seed + j, colours=ways[:, j])
             for j in range(3)]
    data = from_shop(shops[0], taxonomy)
    data.images = np.concatenate([s.images for s in shops])
    data.category = np.concatenate([s.category for s in shops])
    data.item_ids = np.tile(np.arange(garments), 3)  # the garment: the same in each colourway
    data.groups = {COLOUR_GROUP: np.concatenate([s.colour for s in shops])}
    preds = predict_dataset(predictor.model, data, predictor.manifest.image_size, torch.device("cpu"))
    pred_colour = preds.groups[COLOUR_GROUP].argmax(1)
    other = pred_colour[:, None] != pred_colour[None, :]  # "another colour": by the colour tags the worker writes
    mask = predictor.condition_masks()[COLOUR_GROUP]
    garment = data.item_ids
    out = {}
    for rule in ("none", *COLOUR_FREE_RULES):
        e = _shelf(preds.embedding, preds.category, w)
        if rule != "none":
            e = colour_free(e, mask, rule)
        top = _topk_others(e, 5, other)
        out[rule] = {"hit@5": float((garment[top] == garment[:, None]).any(axis=1).mean()),
                     "hit@1": float((garment[top[:, 0]] == garment).mean())}
    out["colour_accuracy"] = float((pred_colour == data.groups[COLOUR_GROUP]).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--fmnist-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--weights", default="0,0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--quickstart-items", type=int, default=300)
    ap.add_argument("--colourways", type=int, default=1000, help="garments, three colours each")
    args = ap.parse_args()
    import torch

    from model.inference import load_predictor

    torch.set_num_threads(1)
    weights = [float(w) for w in args.weights.split(",")]
    predictor = load_predictor(args.model_dir, device="cpu", mixed_precision=False)
    served = predictor.manifest.shelf_category_weight
    shop = fmnist_shop(predictor, args.fmnist_dir, weights)
    qs = quickstart(predictor, args.fmnist_dir, weights, args.quickstart_items)
    ways = colourways(predictor, args.fmnist_dir, args.colourways, served)
    print(f"model {predictor.version} (its shelf category weight: {served})")
    print(f"{'w':>9} | {'FMNIST-shop R@1':>15} {'P@5 same cat.':>13} | {'quickstart P@5':>14}")
    for key in shop:
        print(f"{key:>9} | {shop[key]['R@1']:>15.4f} {shop[key]['category_P@5']:>13.4f} | "
              f"{qs[key]['category_P@5']:>14.4f}")
    print(f"other colours (colourways of {args.colourways} garments, w={served}; colour accuracy "
          f"{ways['colour_accuracy']:.4f}):")
    for rule, r in ways.items():
        if rule != "colour_accuracy":
            print(f"  {rule:>12}: same garment in another colour in the top 5 {r['hit@5']:.4f}, "
                  f"at rank 1 {r['hit@1']:.4f}")
    print(json.dumps({"model": predictor.version, "fmnist_shop": shop, "quickstart": qs, "colourways": ways}))


if __name__ == "__main__":
    main()
