"""Do the labels people give teach the model? Retraining with corrections against a control of equal budget, with
the review queue's order against random and FIFO, and against the same number of randomly chosen new labels.

    nice python benchmarks/retrain_corrections.py            # 3 seeds (~30 min on 2 cores)
    python benchmarks/retrain_corrections.py --seeds 0 --parts fixes answers --active DIR

What it does, as a retraining job does it (``training.train.train`` from the active model's weights, the answers
as extra training rows through ``training.corrections.corrections_to_images``), in one process:
  1. the active model: the quick recipe at `--base-steps` classification steps (trained once, seed 0);
  2. a catalogue: a random half of the Fashion-MNIST *test* garments as listings with one photo each, taken
     as the marketplace's sellers take them (`--domain seller`: a lighter background and a smaller, off-centre
     garment — photos unlike the training set's, which is where people's labels can teach; `same`:
     rendered as the training photos). The active model tags them; those below its calibrated category
     threshold are the review queue (at least the 3 × `--answers` least sure); the other half of the
     test garments, photographed the same way, is measured;
  3. per seed, retrainings of `--steps` classification steps from the active model (the same steps for
     every row, so more training alone is not credited to the labels):
       control          no new labels
       pair fixes ×R    the corrections of the confused pair (default Shirt vs T-shirt/top: every catalogue
                        listing of the pair the active model tagged wrong), repeated R times in the training
                        set (`--repeats` sweeps R)
       pair answers ×R  as many of the pair's listings in the review queue answered, right tags confirmed too
       queue:<order> ×R the first `--answers` review items in that order answered (the true category; a
                        confirmation is a label too): gain (worker.review_order, ENRICH_REVIEW_ORDER=gain),
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
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from _learning import RESULTS, bar_plot, fmt, pair_accuracy, predict, spread

CATALOGUE_SEED = 7


def cached_preparation(prepare, cache: dict):
    """``training.prepare.prepare_data`` computed once per seed: every retraining reads the same split."""
    def prepared(cfg, taxonomy):
        if cfg.seed not in cache:
            cache[cfg.seed] = prepare(cfg, taxonomy)
        return cache[cfg.seed]
    return prepared


def seller_photos(garments: np.ndarray, colours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photos as a marketplace's sellers take them: the garment at 80–95 % of the frame, off-centre by up
    to 3 px, on a lighter background (the training photos: full frame, centred ±2 px, grey 95–165)."""
    import torch
    import torch.nn.functional as F

    from schemas.taxonomy import load_taxonomy
    from training.fmnist_shop import COLOUR_GROUP, COLOUR_RGB, _compose

    n = len(garments)
    scale = rng.uniform(0.8, 0.95, n)
    shift = rng.uniform(-3, 3, (n, 2)) * (2 / 28)
    zero = np.zeros(n)
    theta = np.stack([np.stack([1 / scale, zero, -shift[:, 0]], 1), np.stack([zero, 1 / scale, -shift[:, 1]], 1)], 1)
    x = torch.from_numpy(garments).float()[:, None] / 255.0
    grid = F.affine_grid(torch.from_numpy(theta).float(), [n, 1, 28, 28], align_corners=False)
    intensity = (F.grid_sample(x, grid, align_corners=False)[:, 0].numpy() * 255.0).astype(np.uint8)
    values = load_taxonomy("fashion-mnist").group(COLOUR_GROUP).values
    rgb = np.array([COLOUR_RGB[values[c]] for c in colours], dtype=np.float32)
    return _compose(intensity, rgb, rng.uniform(170, 210, n).astype(np.float32), np.ones(n, np.float32),
                    np.zeros((n, 28, 28, 3), np.float32))


def answers_as_rows(photos: np.ndarray, idx: np.ndarray, truth: np.ndarray, taxonomy, size: int):
    """The answered listings as training rows, through the corrections' own path (first photo, labels)."""
    from PIL import Image

    from schemas.taxonomy import CATEGORY_GROUP
    from training.corrections import CorrectionLabel, corrections_to_images

    names = taxonomy.category_names
    now = datetime.now(UTC)
    labels = [CorrectionLabel(f"l{i}", CATEGORY_GROUP, names[truth[i]], int(truth[i]), [str(i)], now) for i in idx]
    return corrections_to_images(labels, taxonomy, lambda uri: Image.fromarray(photos[int(uri)]), size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="Shirt,T-shirt/top", help="the confused pair (default: %(default)s)")
    ap.add_argument("--domain", choices=["seller", "same"], default="seller", help="how listings are photographed")
    ap.add_argument("--base-steps", type=int, default=3000, help="the active model's classification steps")
    ap.add_argument("--active", type=Path, default=None, help="an active model directory (default: train one)")
    ap.add_argument("--steps", type=int, default=600, help="classification steps of each retraining")
    ap.add_argument("--lr", type=float, default=1e-3, help="retraining learning rate (default: %(default)s)")
    ap.add_argument("--repeats", type=int, nargs="+", default=[4, 16], help="how many times a label counts: pair "
                    "fixes at all but the last, pair answers at each, the queue at the last (default: 4 16)")
    ap.add_argument("--answers", type=int, default=300, help="review answers per queue order (default: 300)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parts", nargs="+", choices=["fixes", "answers", "queue"], default=["fixes", "answers", "queue"],
                    help="which retrainings besides the control (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS / "retrain_corrections")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import training.train as trainer
    from model.manifest import read_manifest
    from schemas.taxonomy import load_taxonomy
    from training.config import QUICK
    from training.fmnist import load_fashion_mnist
    from training.fmnist_shop import build_shop
    from worker.review_order import gain_order

    taxonomy = load_taxonomy("fashion-mnist")
    names = taxonomy.category_names
    pair = tuple(names.index(n) for n in args.pair.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-retrain-"))
    prepare, cache = trainer.prepare_data, {}
    trainer.prepare_data = cached_preparation(prepare, cache)
    t_all = time.perf_counter()

    # 1. the active model
    active = args.active
    if active is None:
        steps = (QUICK.stage_steps[0], args.base_steps, QUICK.stage_steps[2])
        active = trainer.train(replace(QUICK, time_budget_s=None, stage_steps=steps, out_dir=work / "models",
                                       model_version="active", progress=False, seed=0))
    threshold = read_manifest(active).thresholds.get("category", 0.5)

    # 2. the catalogue and the measured half, photographed alike
    xt, yt = load_fashion_mnist(QUICK.data_dir, "test")
    rng = np.random.default_rng(CATALOGUE_SEED)
    order = rng.permutation(len(xt))
    halves = np.sort(order[:len(xt) // 2]), np.sort(order[len(xt) // 2:])
    if args.domain == "seller":
        colours = rng.integers(0, len(taxonomy.group("colour").values), len(xt))
        shots = [seller_photos(xt[h], colours[h], rng) for h in halves]
    else:
        shots = [build_shop(xt[h], yt[h], taxonomy, photos_per_item=1, seed=CATALOGUE_SEED + i).images
                 for i, h in enumerate(halves)]
    photos, truth = shots[0], yt[halves[0]].astype(np.int64)
    test_x, test_y = shots[1], yt[halves[1]].astype(np.int64)
    out = predict(active, photos)
    probs, emb = out.category, out.embedding
    tags = probs.argmax(axis=1)
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin_u = 1 - (top2[:, 1] - top2[:, 0])
    below = np.flatnonzero(probs.max(axis=1) < threshold)
    least_sure = np.argsort(-margin_u)[:3 * args.answers]
    queue = np.union1d(below, least_sure)  # arrival order (the FIFO order)
    pair_wrong = np.flatnonzero((np.isin(truth, pair) | np.isin(tags, pair)) & (tags != truth))
    pair_queue = queue[np.isin(truth[queue], pair) | np.isin(tags[queue], pair)]
    before = pair_accuracy(predict(active, test_x).category.argmax(axis=1), test_y, pair)
    facts = {"domain": args.domain, "catalogue": len(truth), "measured": len(test_y), "threshold": threshold,
             "below_threshold": len(below), "review_queue": len(queue),
             "queue_wrong": int((tags[queue] != truth[queue]).sum()), "pair_corrections": len(pair_wrong),
             "pair_in_queue": len(pair_queue), "catalogue_top1": float((tags == truth).mean())}
    print(f"active model on {args.domain} photos: top-1 {before['top1']:.4f}, {args.pair} {before['pair']:.4f}; "
          f"review queue {len(queue)} ({len(below)} below its threshold {threshold:.2f}, {facts['queue_wrong']} "
          f"wrong), {len(pair_wrong)} pair tags wrong, {len(pair_queue)} pair listings in the queue", flush=True)

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
    r = args.repeats[-1]
    n = min(args.answers, len(queue))
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        runs: list[tuple[str, np.ndarray | None, int]] = [("control", None, 1)]
        if "fixes" in args.parts:
            runs += [(f"pair fixes ×{k}", pair_wrong, k) for k in args.repeats[:-1]]
        if "answers" in args.parts:
            answered = pair_queue[gain_order(margin_u[pair_queue], emb[pair_queue])[0][:len(pair_wrong)]]
            runs += [(f"pair answers ×{k}", answered, k) for k in args.repeats]
        if "queue" in args.parts:
            orders = {"gain": queue[gain_order(margin_u[queue], emb[queue])[0][:n]],
                      "random": rng.permutation(queue)[:n], "fifo": queue[:n]}
            runs += [(f"queue:{name} ×{r}", idx, r) for name, idx in orders.items()]
            runs += [(f"random labels ×{r}", rng.choice(len(truth), n, replace=False), r)]
        for label, idx, repeats in runs:
            results.setdefault(label, []).append({"seed": seed, **retrain(seed, label, idx, repeats)})

    control = {x["seed"]: x for x in results["control"]}
    print(f"\n{args.steps} retraining steps from the active model (on {args.domain} photos: top-1 "
          f"{before['top1']:.4f}, {args.pair} {before['pair']:.4f}); gains over the control of the same seed, "
          f"percentage points, mean ± sd over seeds {args.seeds}")
    print(f"{'retraining':24s} {'labels':>6s} {'pair':>15s} {'pair gain':>15s} {'top-1 gain':>15s} "
          f"{'top-1 gain/100':>14s}")
    summary = {"facts": facts, "before": before, "steps": args.steps, "base_steps": args.base_steps,
               "seeds": args.seeds, "results": {}}
    for label, rs in results.items():
        pg = [x["pair"] - control[x["seed"]]["pair"] for x in rs]
        tg = [x["top1"] - control[x["seed"]]["top1"] for x in rs]
        k = rs[0]["labels"]
        per100 = f"{100 * spread(tg)[0] / k * 100:+14.2f}" if k else f"{'':14s}"
        print(f"{label:24s} {k:6d} {fmt([x['pair'] for x in rs]):>15s} {fmt(pg):>15s} {fmt(tg):>15s} {per100}")
        summary["results"][label] = {"labels": k, "pair": spread([x["pair"] for x in rs]), "pair_gain": spread(pg),
                                     "top1_gain": spread(tg), "runs": rs}
    summary["seconds"] = round(time.perf_counter() - t_all)
    trainer.prepare_data = prepare
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=float))
    labels = [k for k in results if k != "control"]
    bar_plot(args.out.with_suffix(".png"), f"Retraining with people's labels ({args.domain} photos): gain over "
             f"the control", labels,
             {f"{args.pair} accuracy": [[x["pair"] - control[x["seed"]]["pair"] for x in results[k]] for k in labels],
              "top-1": [[x["top1"] - control[x["seed"]]["top1"] for x in results[k]] for k in labels]},
             "gain over the control (points)", baseline=0.0, baseline_label="control")
    print(json.dumps({k: {"pair": v["pair_gain"], "top1": v["top1_gain"]} for k, v in summary["results"].items()}))


if __name__ == "__main__":
    main()
