"""Metrics over arrays of predictions and labels: classification (top-k, F1, confusion), multi-label (Hamming,
micro-F1, exact match), ranking (average precision) and retrieval (Recall@K, mAP@R). Numbers in, numbers out:
which rows and outputs of a taxonomy they are applied to is training.scores's business."""
from __future__ import annotations

import numpy as np


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 3, 5)) -> dict[str, float]:
    keep = labels >= 0
    probs, labels = probs[keep], labels[keep]
    if len(labels) == 0:
        return {f"top{k}": float("nan") for k in ks}
    order = np.argsort(-probs, axis=1)
    out = {}
    for k in ks:
        k_eff = min(k, probs.shape[1])
        out[f"top{k}"] = float((order[:, :k_eff] == labels[:, None]).any(axis=1).mean())
    return out


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    keep = labels >= 0
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels[keep], pred[keep]), 1)
    return cm


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def f1_scores(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Macro-F1 over classes present in labels or predictions; weighted-F1 by true support."""
    cm = confusion_matrix(pred, labels, num_classes)
    f1 = per_class_f1(cm)
    support = cm.sum(axis=1)
    seen = (support + cm.sum(axis=0)) > 0
    macro = float(f1[seen].mean()) if seen.any() else float("nan")
    weighted = float((f1 * support).sum() / support.sum()) if support.sum() else float("nan")
    return {"macro_f1": macro, "weighted_f1": weighted}


def multilabel_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Binary (N, A) predictions vs targets: Hamming loss, micro-F1, exact-match ratio."""
    pred = pred.astype(bool)
    target = target.astype(bool)
    tp = float((pred & target).sum())
    fp = float((pred & ~target).sum())
    fn = float((~pred & target).sum())
    micro = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0
    return {
        "hamming": float((pred != target).mean()) if pred.size else float("nan"),
        "micro_f1": micro,
        "exact_match": float((pred == target).all(axis=1).mean()) if len(pred) else float("nan"),
    }


def per_attribute_f1(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    pred = pred.astype(bool)
    target = target.astype(bool)
    tp = (pred & target).sum(axis=0).astype(np.float64)
    fp = (pred & ~target).sum(axis=0)
    fn = (~pred & target).sum(axis=0)
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one label: the mean precision at the rank of each positive (NaN without positives)."""
    positive = np.asarray(positive, dtype=bool)
    if not positive.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = positive[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def retrieval_metrics(query: np.ndarray, query_ids: np.ndarray, gallery: np.ndarray, gallery_ids: np.ndarray,
                      ks: tuple[int, ...] = (1, 5, 10, 20), chunk: int = 1024,
                      query_category: np.ndarray | None = None, gallery_category: np.ndarray | None = None
                      ) -> dict[str, float]:
    """Cosine retrieval of query photos against the gallery (In-shop protocol).

    Recall@K: share of queries with a same-item photo among the top K. mAP@R: for R = number of
    gallery photos of the query's item, mean precision at each relevant rank within the top R.
    Queries whose item has no gallery photo are skipped. With categories: ``category_precision@5``, the
    share of the top 5 in the query's category (how well a shelf stays in the category).
    """
    categories = None
    if query_category is not None or gallery_category is not None:
        if query_category is None or gallery_category is None:
            raise ValueError("category precision needs the categories of both the queries and the gallery")
        categories = (query_category, gallery_category)
    q = query / np.linalg.norm(query, axis=1, keepdims=True).clip(1e-12)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True).clip(1e-12)
    uniq, counts = np.unique(gallery_ids, return_counts=True)
    n_rel = dict(zip(uniq.tolist(), counts.tolist(), strict=True))
    kmax = min(max(max(ks), counts.max() if len(counts) else 1), len(g))
    hits = dict.fromkeys(ks, 0)
    ap_sum, n = 0.0, 0
    same_cat, n_cat = 0.0, 0
    for s in range(0, len(q), chunk):
        sims = q[s:s + chunk] @ g.T
        if kmax < len(g):
            top = np.argpartition(-sims, kmax - 1, axis=1)[:, :kmax]
        else:
            top = np.tile(np.arange(len(g)), (len(sims), 1))
        top_s = np.take_along_axis(sims, top, axis=1)
        top = np.take_along_axis(top, np.argsort(-top_s, axis=1, kind="stable"), axis=1)
        for i, (row, qid) in enumerate(zip(top, query_ids[s:s + chunk], strict=True)):
            if categories is not None and categories[0][s + i] >= 0:
                same_cat += float((categories[1][row[:5]] == categories[0][s + i]).mean())
                n_cat += 1
            r = n_rel.get(int(qid), 0)
            if r == 0:
                continue
            n += 1
            rel = gallery_ids[row] == qid
            for k in ks:
                hits[k] += bool(rel[:k].any())
            rel_r = rel[:r]
            prec = np.cumsum(rel_r) / np.arange(1, r + 1)
            ap_sum += float((prec * rel_r).sum() / r)
    out = {f"recall@{k}": hits[k] / n if n else float("nan") for k in ks}
    out["map@r"] = ap_sum / n if n else float("nan")
    if categories is not None:
        out["category_precision@5"] = same_cat / n_cat if n_cat else float("nan")
    return out
