"""Per-label confidence thresholds calibrated on validation data (best F1), stored in the manifest.

For a label v of a group, the worker accepts "v" when v is the top prediction and its probability is at
least the threshold; below it the prediction goes to review. The threshold maximises F1 of that
accept rule for v on validation data. The group threshold does the same for "accept the top value".

Two limits keep a threshold from shutting a label out: a per-label threshold needs MIN_SUPPORT validation
examples to be fit on (fewer, and the group's threshold applies to the label), and no threshold exceeds
MAX_THRESHOLD.
"""
from __future__ import annotations

import numpy as np

MIN_SUPPORT = 5  # validation examples a per-label threshold is fit on; below it the group's threshold applies
# Best F1 on examples that are all right cuts at their lowest score, which is 1.0 where a float32 softmax
# saturates on easy examples: such a threshold accepts almost nothing on new data. 0.99 still asks for near
# certainty and leaves no group or label that can never be filled.
MAX_THRESHOLD = 0.99


def best_f1_threshold(scores: np.ndarray, positive: np.ndarray, n_positive: int | None = None,
                      floor: float = 0.0, cap: float = MAX_THRESHOLD) -> tuple[float, float]:
    """Threshold on scores maximising F1 of (score >= t) vs positive, at most ``cap``; returns (threshold, f1)
    (the F1 of the best cut; a capped threshold accepts at least what that cut accepted).

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
    return float(min(max(s[i], floor), cap)), float(f1[i])


def calibrate_exclusive(probs: np.ndarray, labels: np.ndarray, values: list[str], group: str,
                        min_support: int = MIN_SUPPORT) -> tuple[float, dict[str, float]]:
    """Group threshold and per-label ones: a label's threshold is fit on the examples predicted as it."""
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
        if n_true == 0 or int(chosen.sum()) < min_support:
            continue  # the group's threshold applies
        t, _ = best_f1_threshold(conf[chosen], correct[chosen], n_positive=n_true)
        per_label[f"{group}/{name}"] = t
    return group_t, per_label


def calibrate_multilabel(probs: np.ndarray, target: np.ndarray, values: list[str], group: str,
                         min_support: int = MIN_SUPPORT) -> tuple[float, dict[str, float]]:
    """Per-label thresholds for labels with ``min_support`` positive examples; the group's is the median over
    every label with a positive (the others fall back to it)."""
    fitted, per_label = [], {}
    for v, name in enumerate(values):
        positive = target[:, v] > 0.5
        if not positive.any():
            continue
        t, _ = best_f1_threshold(probs[:, v], positive)
        fitted.append(t)
        if int(positive.sum()) >= min_support:
            per_label[f"{group}/{name}"] = t
    group_t = float(np.median(fitted)) if fitted else 0.5
    return group_t, per_label
