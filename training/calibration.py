"""Per-label confidence thresholds calibrated on validation data (best F1), stored in the manifest.

For a label v of a group, the worker accepts "v" when v is the top prediction and its probability is at
least the threshold; below it the prediction goes to review. The threshold maximises F1 of that
accept rule for v on validation data. The group threshold does the same for "accept the top value".
"""
from __future__ import annotations

import numpy as np


def best_f1_threshold(scores: np.ndarray, positive: np.ndarray, n_positive: int | None = None,
                      floor: float = 0.0) -> tuple[float, float]:
    """Threshold on scores maximising F1 of (score >= t) vs positive; returns (threshold, f1).

    ``n_positive``: all positives for recall, including those the rule can never accept.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    total_pos = int(positive.sum()) if n_positive is None else n_positive
    if len(scores) == 0 or total_pos == 0:
        return 0.5, 0.0
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positive[order]
    tp = np.cumsum(p)
    fp = np.cumsum(~p)
    f1 = 2 * tp / (tp + fp + total_pos)
    # only cut between distinct scores
    last = np.r_[s[1:] != s[:-1], True]
    i = int(np.argmax(np.where(last, f1, -1)))
    return float(max(s[i], floor)), float(f1[i])


def calibrate_exclusive(probs: np.ndarray, labels: np.ndarray, values: list[str], group: str
                        ) -> tuple[float, dict[str, float]]:
    keep = labels >= 0
    probs, labels = probs[keep], labels[keep]
    if len(labels) == 0:
        return 0.5, {}
    top = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    correct = top == labels
    group_t, _ = best_f1_threshold(conf, correct, n_positive=len(labels))
    per_label = {}
    for v, name in enumerate(values):
        chosen = top == v
        n_true = int((labels == v).sum())
        if n_true == 0 or not chosen.any():
            continue
        t, _ = best_f1_threshold(conf[chosen], correct[chosen], n_positive=n_true)
        per_label[f"{group}/{name}"] = t
    return group_t, per_label


def calibrate_multilabel(probs: np.ndarray, target: np.ndarray, values: list[str], group: str
                         ) -> tuple[float, dict[str, float]]:
    per_label = {}
    for v, name in enumerate(values):
        if target[:, v].sum() == 0:
            continue
        per_label[f"{group}/{name}"], _ = best_f1_threshold(probs[:, v], target[:, v] > 0.5)
    group_t = float(np.median(list(per_label.values()))) if per_label else 0.5
    return group_t, per_label
