"""Training quality runs: the QUICK preset, the long staged run, staged vs unified training.

    python benchmarks/train_quality.py quick                    # ≥ 90 % FMNIST top-1 in ≤ ~4 min?
    python benchmarks/train_quality.py compare --budget 900     # staged vs unified, same time budget
    nice -n 10 python benchmarks/train_quality.py full          # long staged run (hours on 2 cores)
    python benchmarks/train_quality.py full-lite0 --budget 7500 # the same recipe on pretrained Lite0 at 64 px
    python benchmarks/train_quality.py full-gpu                 # the quality run on one GPU (~6 min)
    python benchmarks/train_quality.py compare --base full-gpu --budget 150   # staged vs unified on a GPU

Prints each run's wall time, the CPU seconds this process used (on a shared machine wall time
swings with other load; CPU seconds do not), the machine (cores, load average) and the test metrics
on the fixed FMNIST-shop evaluation set; writes the same as JSON under --out.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# FMNIST top-1: the Fashion-MNIST test images as published (grey); renders: their plain tinted renderings
KEYS = [("test_grey/top1", "FMNIST top-1"), ("test_plain/top1", "renders top-1"), ("test/top1", "shop top-1"),
        ("test/macro_f1", "macro-F1"), ("test/weighted_f1", "W-F1"), ("test/attr/exact_match", "colour EM"),
        ("test/attr/hamming", "Hamming"),
        ("test/recall@1", "R@1"), ("test/recall@5", "R@5"), ("test/map@r", "mAP@R"),
        ("no_flip/top1", "top-1 w/o flip"), ("no_flip/recall@1", "R@1 w/o flip")]  # flip_tta models only


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)  # DataLoader workers
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def machine() -> dict:
    model = ""
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cores": os.cpu_count(), "cpu": model, "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "loadavg_at_end": os.getloadavg()}


def run(name: str, cfg) -> dict:
    from training.train import train

    t0, c0 = time.perf_counter(), _cpu_seconds()
    load0 = os.getloadavg()
    model_dir = train(cfg)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    manifest = json.loads((model_dir / "manifest.json").read_text())
    metrics = manifest["metrics"]
    if manifest.get("flip_tta"):  # the same weights and test set without the mirror image: what the flip adds
        from training.evaluate import evaluate_model_dir

        plain = evaluate_model_dir(model_dir, cfg, device=cfg.device, progress=False, flip_tta=False)
        metrics["no_flip/top1"] = plain["test_grey/top1"]
        metrics["no_flip/recall@1"] = plain["test/recall@1"]
    return {"name": name, "model_dir": str(model_dir), "wall_s": wall, "cpu_s": cpu, "loadavg_at_start": load0,
            "strategy": cfg.strategy, "backbone": cfg.backbone, "image_size": cfg.image_size,
            "time_budget_s": cfg.time_budget_s, "metrics": metrics}


def table(results: list[dict]) -> str:
    head = "| run | wall s | CPU s | " + " | ".join(label for _, label in KEYS) + " |"
    sep = "|" + "---|" * (3 + len(KEYS))
    rows = [f"| {r['name']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
            + " | ".join(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "–" for k, _ in KEYS) + " |"
            for r in results]
    return "\n".join([head, sep, *rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", help="a preset's run, or compare (staged vs unified)",
                   choices=["quick", "quick-lite0", "compare", "full", "full-lite0", "full-gpu", "full-gpu-lite0"])
    p.add_argument("--base", choices=["quick", "full-gpu"], default="quick",
                   help="compare: the preset both strategies start from (default: quick)")
    p.add_argument("--strategies", default="staged,unified", help="compare: which strategies (default: both)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the idle cores)")
    p.add_argument("--device", default=None, help="cpu, cuda, auto (default: the preset's)")
    p.add_argument("--backbone", default=None, help="registered backbone, e.g. wrn16_8 (default: the preset's)")
    p.add_argument("--grey-photos", action=argparse.BooleanOptionalAction, default=None,
                   help="also train on each item's grey Fashion-MNIST image (default: the preset's)")
    p.add_argument("--grey-repeats", type=int, default=None,
                   help="the grey photos count this many times in training (default: the preset's)")
    p.add_argument("--joint-warmup", type=float, default=None,
                   help="fraction of the joint stage with a linear lr warm-up (default: the preset's)")
    p.add_argument("--joint-trunk-lr", type=float, default=None,
                   help="the joint stage's backbone lr ÷ its heads' (default: the preset's)")
    p.add_argument("--items", type=int, default=None,
                   help="smoke test: this many train/val/test items instead of all (figures then mean nothing)")
    p.add_argument("--budget", type=float, default=None, help="time budget per run in seconds "
                   "(default: the preset's; compare: 900)")
    p.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                   help="Fashion-MNIST idx directory (default: Debian's)")
    p.add_argument("--out", type=Path, default=ROOT / ".enrich" / "bench", help="results and models "
                   "(default: .enrich/bench)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from training.config import FULL_GPU, PRESETS, QUICK

    args.out.mkdir(parents=True, exist_ok=True)
    base = {"out_dir": args.out / "models", "data_dir": args.data_dir, "progress": False, "threads": args.threads}
    if args.device:
        base["device"] = args.device
    if args.backbone:
        base["backbone"] = args.backbone
    if args.grey_photos is not None:
        base["grey_photos"] = args.grey_photos
    if args.grey_repeats is not None:
        base["grey_repeats"] = args.grey_repeats
    if args.joint_warmup is not None:
        base["joint_warmup"] = args.joint_warmup
    if args.joint_trunk_lr is not None:
        base["joint_trunk_lr"] = args.joint_trunk_lr
    if args.items:
        base.update(train_items=args.items, val_items=max(100, args.items // 4), test_items=args.items)
    results = []
    if args.what == "compare":
        budget = args.budget or 900.0
        # the same data, backbone and budget; only the strategy differs
        if args.base == "quick":
            common = replace(QUICK, **base, time_budget_s=budget, val_items=2000, stage_steps=(2000, 8000, 4000),
                             unified_steps=14000)
        else:
            common = replace(FULL_GPU, **base, time_budget_s=budget, unified_steps=sum(FULL_GPU.stage_steps))
        for strategy in args.strategies.split(","):
            results.append(run(strategy, replace(common, strategy=strategy)))
    else:
        cfg = replace(PRESETS[args.what], **base)
        if args.budget:
            cfg = replace(cfg, time_budget_s=args.budget)
        results.append(run(args.what, cfg))
    doc = {"command": " ".join(sys.argv), "machine": machine(), "results": results}
    out = args.out / f"train_{args.what}_{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
    out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc["machine"]))
    print(table(results))
    print(f"written {out}")


if __name__ == "__main__":
    main()
