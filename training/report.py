"""Training report folder: metrics.json, summary.md and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from schemas.taxonomy import Taxonomy
from training.scores import EvalResult


def _plt():
    import matplotlib  # lazy: the backend must be chosen before pyplot is first imported

    matplotlib.use("Agg")  # no display here or on servers
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for stage in dict.fromkeys(h["stage"] for h in history):
        rows = [h for h in history if h["stage"] == stage and "total" in h]
        if not rows:
            continue
        y = np.array([h["total"] for h in rows])
        k = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(offset + np.arange(len(smooth)), smooth, label=stage)
        offset += len(y)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title("Loss per stage")
    if offset:  # no training steps (e.g. a warm start evaluated as it is): an empty plot, no legend
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(cm: np.ndarray, names: list[str], path: Path) -> None:
    plt = _plt()
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(5, len(names) * 0.45), max(4, len(names) * 0.4)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Category confusion (row-normalised)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bars(values: dict[str, float], title: str, path: Path) -> None:
    plt = _plt()
    names = list(values)
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.25 * len(names))))
    ax.barh(range(len(names)), [values[n] for n in names])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_recall(metrics: dict[str, float], path: Path, prefix: str = "test/") -> bool:
    ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith(prefix + "recall@"))
    if not ks:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, [metrics[f"{prefix}recall@{k}"] for k in ks], marker="o")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1.02)
    ax.set_title("Retrieval: query vs gallery")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fmt(v: float) -> str:
    return "n/a" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}"


def write_report(out: Path, *, taxonomy: Taxonomy, config: dict, metrics: dict[str, float],
                 stage_metrics: dict[str, dict[str, float]], history: list[dict], test: EvalResult) -> Path:
    """Write metrics.json, summary.md, loss.png, confusion.png, per_label_f1.png, recall_at_k.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_class = dict(zip(taxonomy.category_names, test.per_class_f1.tolist(), strict=True))
    (out / "metrics.json").write_text(json.dumps({
        "test": metrics, "stages_best_validation": stage_metrics, "per_class_f1": per_class,
        "per_label_f1": test.per_label_f1,
        "per_group_map": {k.split("/map/", 1)[1]: v for k, v in metrics.items() if k.startswith("test/map/")},
        "confusion": test.confusion.tolist(), "config": config,
        "history": history,
    }, indent=1, default=float))
    plot_losses(history, out / "loss.png")
    plot_confusion(test.confusion, taxonomy.category_names, out / "confusion.png")
    plot_bars(test.per_label_f1 or per_class, "Per-attribute F1 (test)" if test.per_label_f1 else "Per-class F1",
              out / "per_label_f1.png")
    has_recall = plot_recall(metrics, out / "recall_at_k.png")
    lines = [f"# Training report: {config.get('model_version') or taxonomy.name}", "",
             f"- backbone `{config.get('backbone')}`, image size {config.get('image_size')}, "
             f"strategy `{config.get('strategy')}`, dataset `{config.get('dataset')}`",
             f"- training time {metrics.get('train_seconds', float('nan')):.0f} s", "",
             "## Test metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if k != "train_seconds"]
    group_map = {k.split("/map/", 1)[1]: v for k, v in metrics.items() if k.startswith("test/map/")}
    if group_map:
        lines += ["", "## Per-group mAP (test)", "", "| group | mAP |", "|---|---|"]
        lines += [f"| {g} | {_fmt(v)} |" for g, v in group_map.items()]
    lines += ["", "## Best validation per stage", ""]
    for stage, m in stage_metrics.items():
        keys = [k for k in ("top1", "macro_f1", "weighted_f1", "colour/accuracy", "attr/exact_match",
                            "attr/hamming", "attr/micro_f1", "recall@1", "recall@5", "map@r") if k in m]
        lines.append(f"- **{stage}**: " + ", ".join(f"{k} {_fmt(m[k])}" for k in keys))
    lines += ["", "## Plots", "", "![loss](loss.png) ![confusion](confusion.png) ![F1](per_label_f1.png)"]
    if has_recall:
        lines.append("![recall](recall_at_k.png)")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return out
