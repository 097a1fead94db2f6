"""Which training choices raise the ceiling? One stage, small data, one variable changed per run.

Classification (default). The long GPU run plateaus while the training loss keeps falling, so the question
is regularisation, not speed. This reproduces that regime on a CPU: few items (``--items``), many passes,
the small CNN, one variable changed per run against a pinned baseline (PINNED below) in the same run.

Retrieval (``--stage retrieval``). Stage 1 (triplet only, from scratch, batch 512) can stall at the margin:
the same batch shape on the small CNN, learning rate 1e-3 against 1e-4.

    python benchmarks/recipe_ablation.py                         # ~35 min on 2 cores
    python benchmarks/recipe_ablation.py --variants full,shift --steps 2000
    python benchmarks/recipe_ablation.py --stage retrieval       # ~4 min

Joint (``--stage joint``). Stage 3 trades category accuracy for retrieval: the full preset's stages 1–2
run once (all 55 000 items), then each variant's stage 3 starts from those weights (``init_from``).

    python benchmarks/recipe_ablation.py --stage joint           # ~30 min
    python benchmarks/recipe_ablation.py --stage joint --grey-photos --variants cls1,cls1+trunk0.3  # ~75 min

Prints per variant the test metric (classification: Fashion-MNIST top-1 on the plain renderings, all
10 000; retrieval: FMNIST-shop R@1; joint: both) and its difference to the stage's baseline (the first variant
listed for it); writes the table as JSON under --out.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# stage -> name -> TrainConfig overrides; the first is the stage's baseline. PINNED fixes the classification and
# retrieval runs' other choices, so reruns compare the same things whatever the presets say now.
PINNED = {"augment": "light", "label_smoothing": 0.0, "weight_decay": 1e-4, "loss_weights": {"cls": 0.2}}
CLASSIFICATION = {
    "full": {"augment": "full"},
    "shift": {"augment": "shift"},
    "full+ls": {"augment": "full", "label_smoothing": 0.1},
    "shift+ls": {"augment": "shift", "label_smoothing": 0.1},
    "shift+wd": {"augment": "shift", "weight_decay": 0.05},
    "shift+ls+wd": {"augment": "shift", "label_smoothing": 0.1, "weight_decay": 0.05},
    "none": {"augment": "none"},
}
RETRIEVAL = {"lr1e-3": {"lr_retrieval": 1e-3}, "lr1e-4": {"lr_retrieval": 1e-4}}
JOINT = {"cls0.2": {"loss_weights": {"cls": 0.2}}, "cls0.2+lr2e-4": {"loss_weights": {"cls": 0.2}, "lr_joint": 2e-4},
         "cls1": {"loss_weights": {"cls": 1.0}},  # λcls 1.0 against the baseline's 0.2
         # the joint stage's first steps cost top-1 (fresh AdamW on tuned weights): a warm-up, or a lower lr
         "cls1+warmup0.1": {"loss_weights": {"cls": 1.0}, "joint_warmup": 0.1},
         "cls1+lr2e-4": {"loss_weights": {"cls": 1.0}, "lr_joint": 2e-4},
         # or the backbone at a fraction of the heads' lr, so retrieval adapts to stage 2's features
         "cls1+trunk0.3": {"loss_weights": {"cls": 1.0}, "joint_trunk_lr": 0.3},
         "cls1+trunk0.1": {"loss_weights": {"cls": 1.0}, "joint_trunk_lr": 0.1}}
STAGES = {"classification": CLASSIFICATION, "retrieval": RETRIEVAL, "joint": JOINT}


def _overrides(variant: dict) -> dict:
    from training.config import LossWeights

    return {k: (LossWeights(**v) if k == "loss_weights" else v) for k, v in variant.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=sorted(STAGES), default="classification")
    p.add_argument("--variants", help="comma-separated (default: all of the stage's): "
                   + "; ".join(f"{k}: {', '.join(v)}" for k, v in STAGES.items()))
    p.add_argument("--steps", type=int, help="steps per run (default: classification 5000, retrieval 600, "
                   "joint: the full preset's stage 3)")
    p.add_argument("--items", type=int, help="Fashion-MNIST train items (default: classification 8000, "
                   "retrieval 20000, joint all)")
    p.add_argument("--batch", type=int, help="batch size (default: classification 128, retrieval 512, joint 64)")
    p.add_argument("--seed", type=int, default=0, help="data split, sampling and test renders (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the idle cores)")
    p.add_argument("--grey-photos", action="store_true", help="train on the grey Fashion-MNIST images too, "
                   "as the presets do (default: renders only)")
    p.add_argument("--joint-start", type=Path, help="joint: a saved stage 1–2 model to start every variant from "
                   "(default: train one; it is saved under --out as ablation-joint-start)")
    p.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--out", type=Path, default=ROOT / ".enrich" / "bench" / "ablation")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from training.config import FULL
    from training.train import train

    variants = STAGES[args.stage]
    names = [v for v in (args.variants or ",".join(variants)).split(",") if v]
    unknown = sorted(set(names) - set(variants))
    if unknown:
        p.error(f"unknown {args.stage} variants {unknown}; known: {', '.join(variants)}")
    common = dict(time_budget_s=None, threads=args.threads, data_dir=args.data_dir, out_dir=args.out, progress=False,
                  workers=0, seed=args.seed, flip_tta=False,  # training choices only: no test-time flip
                  amp=False,  # fp32, as benchmarks/RESULTS.md's ablation figures
                  grey_photos=args.grey_photos)  # renders only unless asked
    metrics = {"renders top-1": "test_plain/top1", "R@1": "test/recall@1"}
    if args.grey_photos:
        metrics["FMNIST top-1"] = "test_grey/top1"
    if args.stage == "joint":  # the full preset's stages 1–2 once; each variant's stage 3 starts there
        steps, items, batch = args.steps or FULL.stage_steps[2], args.items, args.batch or FULL.batch_size
        base = replace(FULL, train_items=items, batch_size=batch, **common)
        start = args.joint_start or train(replace(base, stage_steps=(*FULL.stage_steps[:2], 0),
                                                  model_version="ablation-joint-start"))
        base = replace(base, stage_steps=(0, 0, steps), init_from=start)
    else:
        retrieval = args.stage == "retrieval"
        steps = args.steps or (600 if retrieval else 5000)
        items = args.items or (20000 if retrieval else 8000)
        batch = args.batch or (512 if retrieval else 128)
        metrics = {"R@1": metrics["R@1"]} if retrieval else {"renders top-1": metrics["renders top-1"]}
        base = replace(FULL, stage_steps=(steps, 0, 0) if retrieval else (0, steps, 0), train_items=items,
                       photos_per_item=4, m_per_item=4, val_items=1000, test_items=2000 if retrieval else None,
                       test_photos_per_item=2, batch_size=batch, eval_every=0, **common, **_overrides(PINNED))
    rows = []
    for name in names:
        t0 = time.perf_counter()
        model_dir = train(replace(base, model_version=f"ablation-{args.stage}-{name}", **_overrides(variants[name])))
        m = json.loads((model_dir / "manifest.json").read_text())["metrics"]
        rows.append({"variant": name, **variants[name], **{label: m[key] for label, key in metrics.items()},
                     "wall_s": time.perf_counter() - t0})
        print(name, "  ".join(f"{label} {rows[-1][label]:.4f}" for label in metrics), f"{rows[-1]['wall_s']:.0f}s",
              flush=True)
    first = next((r for r in rows if r["variant"] == next(iter(variants))), rows[0])
    print(f"\n{args.stage}, small_cnn, {items or 'all'} items × 4 photos, {steps} steps of {batch}, seed {args.seed}")
    print(f"{'variant':14s}" + "".join(f"{label:>14s} {'vs base':>8s}" for label in metrics))
    for r in rows:
        print(f"{r['variant']:14s}" + "".join(f"{r[label]:14.4f} {100 * (r[label] - first[label]):+7.2f}pt"
                                              for label in metrics))
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    (args.out / f"{args.stage}-seed{args.seed}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
