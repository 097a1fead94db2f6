"""Seed 002's per-task weights on noisy seller labels: a catalogue where sellers fill some tags, a share of
them wrong, trained with the weights on and off, both measured on the clean FMNIST-shop test set.

    python benchmarks/seller_noise.py                       # 6 000 listings, 20 % wrong, 150 s per training
    python benchmarks/seller_noise.py --wrong 0.2 --budget 300

The catalogue is a JSONL export of FMNIST-shop listings built from Fashion-MNIST *train* garments (one photo
each). Sellers give the category on `--category-share` of them and the colour on `--colour-share` (so the two
tasks have different label counts, which is what the weights respond to); `--wrong` of the given labels are
replaced by another value of the group. Both models train with the quick preset's recipe on that export
(`enrich train --catalogue …`) and are measured on the same fixed FMNIST-shop test set, with true labels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_catalogue(out: Path, fmnist_dir: Path, n: int, category_share: float, colour_share: float,
                    wrong: float, seed: int) -> dict[str, int]:
    from PIL import Image

    from schemas.taxonomy import load_taxonomy
    from training.fmnist import load_fashion_mnist
    from training.fmnist_shop import COLOUR_GROUP, build_shop

    taxonomy = load_taxonomy("fashion-mnist")
    x, y = load_fashion_mnist(fmnist_dir, "train")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(x), size=n, replace=False)
    shop = build_shop(x[pick], y[pick], taxonomy, photos_per_item=1, seed=seed, size=28)
    categories, colours = taxonomy.category_names, taxonomy.group(COLOUR_GROUP).values
    (out / "img").mkdir(parents=True, exist_ok=True)
    stats = {"listings": n, "category": 0, "colour": 0, "wrong": 0}
    with open(out / "catalogue.jsonl", "w") as f:
        for i in range(n):
            path = out / "img" / f"l{i:05d}.png"
            Image.fromarray(shop.images[i]).save(path)
            event = {"listing_id": f"l{i:05d}", "seller_id": "s", "images": [f"img/{path.name}"], "attributes": {}}
            if rng.random() < category_share:
                value = categories[shop.category[i]]
                if rng.random() < wrong:
                    value = rng.choice([c for c in categories if c != value])
                    stats["wrong"] += 1
                event["category"] = str(value)
                stats["category"] += 1
            if rng.random() < colour_share:
                value = colours[shop.colour[i]]
                if rng.random() < wrong:
                    value = rng.choice([c for c in colours if c != value])
                    stats["wrong"] += 1
                event["attributes"][COLOUR_GROUP] = str(value)
                stats["colour"] += 1
            f.write(json.dumps(event) + "\n")
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listings", type=int, default=6000, help="catalogue listings (default: 6 000)")
    ap.add_argument("--category-share", type=float, default=0.7, help="share with a seller category (default: 0.7)")
    ap.add_argument("--colour-share", type=float, default=0.3, help="share with a seller colour (default: 0.3)")
    ap.add_argument("--wrong", type=float, default=0.2, help="share of given labels that are wrong (default: 0.2)")
    ap.add_argument("--budget", type=float, default=150.0, help="training seconds per model (default: 150)")
    ap.add_argument("--test-items", type=int, default=2000, help="FMNIST-shop test items measured (default: 2 000)")
    ap.add_argument("--fmnist-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--seed", type=int, default=2)
    args = ap.parse_args()

    os.environ["ENRICH_ALLOW_LOCAL_PATHS"] = "true"  # the export's photos are local files
    from model.inference import resolve_device
    from schemas.taxonomy import load_taxonomy
    from training.config import QUICK, TrainConfig
    from training.evaluate import _measure  # the model was trained for the catalogue: measure it on clean rows
    from training.prepare import evaluation_set
    from training.train import train

    work = Path(tempfile.mkdtemp(prefix="bench-seller-noise-"))
    stats = build_catalogue(work, Path(args.fmnist_dir), args.listings, args.category_share, args.colour_share,
                            args.wrong, args.seed)
    print(f"catalogue: {stats['listings']} listings, {stats['category']} seller categories, {stats['colour']} "
          f"seller colours, {stats['wrong']} of those labels wrong ({args.wrong:.0%})", flush=True)
    clean = replace(TrainConfig(), dataset="fmnist-shop", taxonomy="fashion-mnist", data_dir=Path(args.fmnist_dir),
                    test_items=args.test_items)
    rows = []
    for weights in (False, True):
        cfg = replace(QUICK, dataset="catalogue", catalogue_source=str(work / "catalogue.jsonl"),
                      taxonomy="fashion-mnist", seed_002_task_weights=weights, time_budget_s=args.budget,
                      out_dir=work / "models", model_version=f"noise-weights-{'on' if weights else 'off'}",
                      progress=False)
        t0 = time.perf_counter()
        model_dir = train(cfg)
        ev_cfg = replace(clean, image_size=cfg.image_size)
        ev = evaluation_set(ev_cfg, load_taxonomy("fashion-mnist"))
        m = _measure(model_dir, ev_cfg, ev, "clean", resolve_device("cpu"), False, None, True).metrics
        rows.append((weights, time.perf_counter() - t0, m))
    print(f"\n{'task weights':<14}{'seconds':>9}{'top-1':>9}{'colour acc':>12}{'R@1':>8}  (clean FMNIST-shop test)")
    for weights, seconds, m in rows:
        colour = m.get("test/colour/accuracy", m.get("test/attr/exact_match", float("nan")))
        print(f"{'on' if weights else 'off':<14}{seconds:>9.0f}{m.get('test/top1', float('nan')):>9.4f}"
              f"{colour:>12.4f}{m.get('test/recall@1', float('nan')):>8.4f}")


if __name__ == "__main__":
    main()
