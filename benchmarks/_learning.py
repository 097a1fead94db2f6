"""What the learning benchmarks share: predicting with a saved model as the worker does, the clean FMNIST-shop
test set, mean ± spread over seeds, and one bar plot per benchmark.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FMNIST_DIR = Path(os.environ.get("ENRICH_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
RESULTS = ROOT / "benchmarks" / "results"


def predict(model_dir: Path, images: np.ndarray, device: str = "cpu"):
    """Category probabilities and embeddings per photo, as the worker computes them."""
    from model.checkpoint import load_model
    from model.inference import resolve_device
    from training.data import LabelledImages
    from training.evaluate import predict_dataset

    dev = resolve_device(device)
    model, manifest = load_model(model_dir)
    n = len(images)
    data = LabelledImages(images, np.zeros(n, np.int64), np.zeros(n, np.int64), {})
    return predict_dataset(model.to(dev), data, manifest.image_size, dev)


def clean_test(test_items: int | None = None, fmnist_dir: Path = FMNIST_DIR):
    """The fixed FMNIST-shop evaluation set with true labels (rows: photos; ``data.item_ids``: garments)."""
    from schemas.taxonomy import load_taxonomy
    from training.config import QUICK
    from training.prepare import fmnist_shop_test

    split, _, _ = fmnist_shop_test(replace(QUICK, data_dir=fmnist_dir, test_items=test_items),
                                   load_taxonomy("fashion-mnist"))
    return split.data


def pair_accuracy(pred: np.ndarray, true: np.ndarray, pair: tuple[int, int]) -> dict[str, float]:
    """top-1 over all rows and the mean of the pair's per-class accuracies."""
    per = [float((pred[true == c] == c).mean()) for c in pair]
    return {"top1": float((pred == true).mean()), "pair": float(np.mean(per))}


def spread(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(values, scale: float = 100.0) -> str:
    m, s = spread(values)
    return f"{m * scale:6.2f} ± {s * scale:4.2f}"


def bar_plot(path: Path, title: str, labels: list[str], series: dict[str, list[list[float]]], ylabel: str,
             baseline: float | None = None, baseline_label: str = "before") -> None:
    """Grouped bars: ``series`` name → per label the values over seeds (mean bar, spread as error bar)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) * len(series)), 4.2))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, per_label) in enumerate(series.items()):
        stats = [spread(v) if len(v) else (np.nan, 0.0) for v in per_label]
        ax.bar(x + i * width - 0.4 + width / 2, [100 * m for m, _ in stats], width,
               yerr=[100 * s for _, s in stats], capsize=3, label=name)
    if baseline is not None:
        ax.axhline(100 * baseline, color="grey", linestyle="--", linewidth=1, label=baseline_label)
    ax.set_xticks(x, labels, rotation=15, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    lo = 100 * min([v for per in series.values() for vs in per for v in vs] + [baseline if baseline is not None
                                                                                 else 1.0])
    ax.set_ylim(lo - 5 if lo > 5 else lo - 1, None)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
