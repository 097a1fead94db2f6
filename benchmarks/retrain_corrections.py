"""Do the labels people give teach the model? Retraining with corrections against a control of equal budget, with
the review queue's order against random and FIFO, and against the same number of randomly chosen new labels.

    nice python benchmarks/retrain_corrections.py            # 3 seeds (~30 min on 2 cores)
    python benchmarks/retrain_corrections.py --seeds 0 --only pair

What it does, as a retraining job does it (``training.train.train`` from the active model's weights, the answers
as extra training rows through ``training.corrections.corrections_to_images``), in one process:
  1. the active model: the quick recipe at `--base-steps` classification steps (trained once, seed 0);
  2. a catalogue: a random half of the Fashion-MNIST *test* garments as shop listings (one photo each); the
     active model tags them, and those below its calibrated category threshold are the review queue; the
     other half of the test garments (their rows of the fixed FMNIST-shop evaluation set) is measured;
  3. per seed, retrainings of `--steps` classification steps from the active model (the same steps for
     every row, so more training alone is not credited to the labels):
       control          no new labels
       pair ×R          the corrections of the confused pair (default Shirt vs T-shirt/top: every catalogue
                        listing of the pair the active model tagged wrong), repeated R times in the training
                        set (R = 4 was the fixed factor; `--repeats` sweeps it)
       queue:<order> ×R the first `--answers` review items in that order answered (the true category; a
                        confirmation is a label too): gain (worker.review_order, the console's default),
                        random, fifo (arrival order)
       random labels ×R as many catalogue listings chosen at random, labelled
  4. each model measured on the other half: the pair's mean per-class accuracy and top-1, as the gain over
     the control of the same seed; gain per 100 labels.
Prints a table (mean ± sample sd over seeds), one JSON line; writes benchmarks/results/retrain_corrections.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from _learning import RESULTS, bar_plot, clean_test, fmt, pair_accuracy, predict, spread

CATALOGUE_SEED = 7


def cached_preparation(prepare, cache: dict):
    """``training.prepare.prepare_data`` computed once per seed: every retraining reads the same split."""
    def prepared(cfg, taxonomy):
        if cfg.seed not in cache:
            cache[cfg.seed] = prepare(cfg, taxonomy)
        return cache[cfg.seed]
    return prepared


def answers_as_rows(photos: np.ndarray, idx: np.ndarray, truth: np.ndarray, taxonomy, size: int):
    """The answered listings as training rows, through the corrections' own path (first photo, labels)."""
    from PIL import Image

    from schemas.taxonomy import CATEGORY_GROUP
    from training.corrections import CorrectionLabel, corrections_to_images

    names = taxonomy.category_names
    now = datetime.now(timezone.utc)
    labels = [CorrectionLabel(f"l{i}", CATEGORY_GROUP, names[truth[i]], int(truth[i]), [str(i)], now) for i in idx]
    return corrections_to_images(labels, taxonomy, lambda uri: Image.fromarray(photos[int(uri)]), size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="Shirt,T-shirt/top", help="the confused pair (default: %(default)s)")
    ap.add_argument("--base-steps", type=int, default=3000, help="the active model's classification steps")
    ap.add_argument("--steps", type=int, default=600, help="classification steps of each retraining")
    ap.add_argument("--lr", type=float, default=1e-3, help="retraining learning rate (default: %(default)s)")
    ap.add_argument("--repeats", type=int, nargs="+", default=[4, 32, 128], help="how many times a label counts")
    ap.add_argument("--answers", type=int, default=300, help="review answers per queue order (default: 300)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", choices=["pair", "queue"], default=None, help="run one part only")
    ap.add_argument("--out", type=Path, default=RESULTS / "retrain_corrections")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import training.train as trainer
    from schemas.taxonomy import load_taxonomy
    from training.config import QUICK
    from training.fmnist import load_fashion_mnist
    from training.fmnist_shop import build_shop
    from model.checkpoint import read_manifest
    from worker.review_order import gain_order

    taxonomy = load_taxonomy("fashion-mnist")
    names = taxonomy.category_names
    pair = tuple(names.index(n) for n in args.pair.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-retrain-"))
    prepare, cache = trainer.prepare_data, {}
    trainer.prepare_data = cached_preparation(prepare, cache)
    t_all = time.perf_counter()

    # 1. the active model
    base_cfg = replace(QUICK, time_budget_s=None, stage_steps=(QUICK.stage_steps[0], args.base_steps,
                                                               QUICK.stage_steps[2]),
                       out_dir=work / "models", model_version="active", progress=False, seed=0)
    active = trainer.train(base_cfg)
    threshold = read_manifest(active).thresholds.get("category", 0.5)

    # 2. the catalogue and the measured half
    xt, yt = load_fashion_mnist(base_cfg.data_dir, "test")
    order = np.random.default_rng(CATALOGUE_SEED).permutation(len(xt))
    listed, measured = np.sort(order[:len(xt) // 2]), np.sort(order[len(xt) // 2:])
    shop = build_shop(xt[listed], yt[listed], taxonomy, photos_per_item=1, seed=CATALOGUE_SEED, size=28)
    photos, truth = shop.images, shop.category
    out = predict(active, photos)
    probs, emb = out.category, out.embedding
    tags = probs.argmax(axis=1)
    test = clean_test(None)
    rows = np.flatnonzero(np.isin(test.item_ids, measured))
    test_x, test_y = test.images[rows], test.category[rows]
    queue = np.flatnonzero(probs.max(axis=1) < threshold)
    pair_wrong = np.flatnonzero((np.isin(truth, pair) | np.isin(tags, pair)) & (tags != truth))
    facts = {"catalogue": len(truth), "measured_rows": len(rows), "threshold": threshold, "review_queue": len(queue),
             "queue_wrong": int((tags[queue] != truth[queue]).sum()), "pair_corrections": len(pair_wrong)}
    before = pair_accuracy(predict(active, test_x).category.argmax(axis=1), test_y, pair)
    print(f"active model: top-1 {before['top1']:.4f}, {args.pair} {before['pair']:.4f} on {len(rows)} measured "
          f"photos; catalogue {len(truth)} listings, review queue {len(queue)} ({facts['queue_wrong']} wrong), "
          f"{len(pair_wrong)} corrections of the pair", flush=True)

    def retrain(seed: int, label: str, idx: np.ndarray | None, repeats: int) -> dict:
        cfg = replace(QUICK, time_budget_s=None, stage_steps=(0, args.steps, 0), lr_classification=args.lr,
                      init_from=active, correction_repeats=repeats, seed=seed, out_dir=work / "models",
                      model_version=f"s{seed}-{label}".replace(" ", "_").replace(":", "-"), progress=False)
        extra = None if idx is None else answers_as_rows(photos, idx, truth, taxonomy, cfg.image_size)
        t0 = time.perf_counter()
        model_dir = trainer.train(cfg, extra)
        m = pair_accuracy(predict(model_dir, test_x).category.argmax(axis=1), test_y, pair)
        m.update(labels=0 if idx is None else len(idx), seconds=round(time.perf_counter() - t0, 1))
        print(f"seed {seed} {label:22s} labels {m['labels']:4d}  top-1 {m['top1']:.4f}  pair {m['pair']:.4f}",
              flush=True)
        return m

    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        runs: list[tuple[str, np.ndarray | None, int]] = [("control", None, 1)]
        if args.only in (None, "pair"):
            runs += [(f"pair ×{r}", pair_wrong, r) for r in args.repeats]
            runs += [(f"random labels ×{r}", rng.choice(len(truth), len(pair_wrong), replace=False), r)
                     for r in args.repeats[-1:]]
        if args.only in (None, "queue"):
            n = min(args.answers, len(queue))
            u = 1 - (np.sort(probs[queue], axis=1)[:, -1] - np.sort(probs[queue], axis=1)[:, -2])
            gain = queue[gain_order(u, emb[queue])[0][:n]]
            orders = {"gain": gain, "random": rng.permutation(queue)[:n], "fifo": queue[:n]}
            r = args.repeats[-1]
            runs += [(f"queue:{name} ×{r}", idx, r) for name, idx in orders.items()]
        for label, idx, repeats in runs:
            results.setdefault(label, []).append({"seed": seed, **retrain(seed, label, idx, repeats)})

    control = {r["seed"]: r for r in results["control"]}
    print(f"\n{args.steps} retraining steps from the active model (top-1 {before['top1']:.4f}, {args.pair} "
          f"{before['pair']:.4f}); gains over the control of the same seed, percentage points, mean ± sd over "
          f"seeds {args.seeds}")
    print(f"{'retraining':24s} {'labels':>6s} {'pair':>15s} {'pair gain':>15s} {'top-1 gain':>15s} "
          f"{'pair gain/100':>14s}")
    summary = {"facts": facts, "before": before, "steps": args.steps, "base_steps": args.base_steps,
               "seeds": args.seeds, "results": {}}
    for label, rs in results.items():
        pg = [r["pair"] - control[r["seed"]]["pair"] for r in rs]
        tg = [r["top1"] - control[r["seed"]]["top1"] for r in rs]
        n = rs[0]["labels"]
        per100 = f"{100 * spread(pg)[0] / n * 100:+14.2f}" if n else f"{'':14s}"
        print(f"{label:24s} {n:6d} {fmt([r['pair'] for r in rs]):>15s} {fmt(pg):>15s} {fmt(tg):>15s} {per100}")
        summary["results"][label] = {"labels": n, "pair": spread([r["pair"] for r in rs]), "pair_gain": spread(pg),
                                     "top1_gain": spread(tg), "runs": rs}
    summary["seconds"] = round(time.perf_counter() - t_all)
    trainer.prepare_data = prepare
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=float))
    labels = [k for k in results if k != "control"]
    bar_plot(args.out.with_suffix(".png"), f"Retraining with labels: gain over the control ({args.pair})", labels,
             {"pair accuracy gain": [[r["pair"] - control[r["seed"]]["pair"] for r in results[k]] for k in labels],
              "top-1 gain": [[r["top1"] - control[r["seed"]]["top1"] for r in results[k]] for k in labels]},
             "gain over control (points)", baseline=0.0, baseline_label="control")
    print(json.dumps({k: v["pair_gain"] for k, v in summary["results"].items()}))


if __name__ == "__main__":
    main()
