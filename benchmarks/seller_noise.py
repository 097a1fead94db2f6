"""What wrong seller labels cost, and which loss wins it back: training labels 20 % wrong, trained with each
label loss, against the clean-label ceiling at the same budget, over several seeds.

    nice python benchmarks/seller_noise.py                  # 3 seeds × 9 trainings (~35 min on 2 cores)
    python benchmarks/seller_noise.py --seeds 0 --methods ce gce --noise symmetric

The quick recipe on FMNIST-shop (two photos per garment) with the training and validation garments' categories
made wrong as sellers make them, per garment (both photos of a listing carry the same seller label):
  - symmetric: `--wrong` of the garments get another category drawn uniformly;
  - pair: `--wrong` of the garments get their confusable partner (Shirt↔T-shirt/top, Pullover↔Coat,
    Sandal↔Sneaker, Ankle boot→Sneaker, Dress→Coat, Trouser→Dress, Bag→Pullover): class-dependent noise.
The product reads seller labels through the catalogue dataset (``enrich train --catalogue``); here they are
flipped in memory on the prepared FMNIST-shop split instead, so that the 27 trainings share one data
preparation per seed. Each training runs a fixed number of steps (not a time budget: the machine's load then
cannot favour one method) and is measured on the fixed clean FMNIST-shop test set with true labels. Prints a
table (mean ± sample standard deviation over seeds), one JSON line, and writes
benchmarks/results/seller_noise.{json,png}.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from _learning import RESULTS, bar_plot, clean_test, fmt, pair_accuracy, predict, spread

PARTNER = {"T-shirt/top": "Shirt", "Shirt": "T-shirt/top", "Pullover": "Coat", "Coat": "Pullover",
           "Sandal": "Sneaker", "Sneaker": "Sandal", "Ankle boot": "Sneaker", "Dress": "Coat",
           "Trouser": "Dress", "Bag": "Pullover"}


def seller_labels(category: np.ndarray, items: np.ndarray, names: list[str], noise: str, wrong: float,
                  seed: int) -> np.ndarray:
    """``category`` with ``wrong`` of the garments (``items``) labelled as ``noise`` says; MISSING rows stay."""
    rng = np.random.default_rng(seed)
    out = category.copy()
    partner = np.array([names.index(PARTNER[n]) for n in names])
    garments = np.unique(items[items >= 0])
    flipped = garments[rng.random(len(garments)) < wrong]
    rows = np.flatnonzero(np.isin(items, flipped) & (category >= 0))
    for item in flipped:
        at = rows[items[rows] == item]
        if not len(at):
            continue
        true = category[at[0]]
        new = partner[true] if noise == "pair" else rng.choice([c for c in range(len(names)) if c != true])
        out[at] = new
    return out


def noisy_preparation(prepare, noise: str, wrong: float, cache: dict):
    """``training.prepare.prepare_data`` with seller noise on the train and val categories."""
    def prepared(cfg, taxonomy):
        if cfg.seed not in cache:
            cache.clear()  # one seed's data at a time
            cache[cfg.seed] = prepare(cfg, taxonomy)
        data = copy.copy(cache[cfg.seed])
        if noise != "clean":
            names = taxonomy.category_names
            data.train = replace(data.train, category=seller_labels(
                data.train.category, data.train.item_ids, names, noise, wrong, cfg.seed))
            val = data.val.data
            data.val = replace(data.val, data=replace(val, category=seller_labels(
                val.category, val.item_ids, names, noise, wrong, cfg.seed + 1)))
        return data
    return prepared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wrong", type=float, default=0.2, help="share of wrong seller categories (default: 0.2)")
    ap.add_argument("--steps", type=int, default=1500, help="classification steps per training (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--noise", nargs="+", default=["symmetric", "pair"], choices=["symmetric", "pair"])
    ap.add_argument("--methods", nargs="+", default=["ce", "gce", "bootstrap", "small_loss"])
    ap.add_argument("--test-items", type=int, default=2000, help="FMNIST-shop test garments measured")
    ap.add_argument("--out", type=Path, default=RESULTS / "seller_noise")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import training.train as trainer
    from schemas.taxonomy import load_taxonomy
    from training.config import QUICK

    names = load_taxonomy("fashion-mnist").category_names
    pair = (names.index("Shirt"), names.index("T-shirt/top"))
    test = clean_test(args.test_items)
    runs = [("clean", "ce")] + [(n, m) for n in args.noise for m in args.methods]
    results: dict[str, list[dict]] = {f"{n}/{m}": [] for n, m in runs}
    work = Path(tempfile.mkdtemp(prefix="bench-seller-noise-"))
    t_all = time.perf_counter()
    prepare, cache = trainer.prepare_data, {}
    try:
        for seed in args.seeds:
            for noise, method in runs:
                trainer.prepare_data = noisy_preparation(prepare, noise, args.wrong, cache)
                cfg = replace(QUICK, time_budget_s=None, stage_steps=(QUICK.stage_steps[0], args.steps, 0),
                              grey_photos=False, label_loss=method, seed=seed, out_dir=work / "models",
                              model_version=f"s{seed}-{noise}-{method}", progress=False)
                t0 = time.perf_counter()
                model_dir = trainer.train(cfg)
                pred = predict(model_dir, test.images).category.argmax(axis=1)
                m = pair_accuracy(pred, test.category, pair)
                top1, pair_acc = m["top1"], m["pair"]
                results[f"{noise}/{method}"].append({"seed": seed, "top1": top1, "pair": pair_acc,
                                                     "seconds": round(time.perf_counter() - t0, 1)})
                print(f"seed {seed} {noise:9s} {method:10s} top-1 {top1:.4f}  Shirt/T-shirt {pair_acc:.4f}  "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
    finally:
        trainer.prepare_data = prepare

    ceiling = [r["top1"] for r in results["clean/ce"]]
    print(f"\n{args.wrong:.0%} wrong seller categories, {args.steps} steps, seeds "
          f"{args.seeds}; clean FMNIST-shop test, {args.test_items} garments (% , mean ± sd)")
    print(f"{'labels':10s} {'loss':11s} {'top-1':>15s} {'vs ceiling':>15s} {'Shirt/T-shirt':>15s}")
    for key, rows in results.items():
        noise, method = key.split("/")
        gap = [r["top1"] - c for r, c in zip(rows, ceiling, strict=True)]
        print(f"{noise:10s} {method:11s} {fmt([r['top1'] for r in rows]):>15s} {fmt(gap):>15s} "
              f"{fmt([r['pair'] for r in rows]):>15s}")
    summary = {"wrong": args.wrong, "steps": args.steps, "seeds": args.seeds,
               "test_items": args.test_items, "seconds": round(time.perf_counter() - t_all),
               "results": {k: {"top1": spread([r["top1"] for r in v]), "pair": spread([r["pair"] for r in v]),
                               "runs": v} for k, v in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    bar_plot(args.out.with_suffix(".png"), f"{args.wrong:.0%} wrong seller categories: clean-test top-1",
             args.methods, {n: [[r["top1"] for r in results[f"{n}/{m}"]] for m in args.methods] for n in args.noise},
             "top-1 (%)", baseline=spread(ceiling)[0], baseline_label="clean labels (ceiling)")
    print(json.dumps({k: v["top1"] for k, v in summary["results"].items()}))


if __name__ == "__main__":
    main()
