"""A model's predictions scored against a labelled set, head by head under its taxonomy: the metrics a
measurement records (``compute_metrics``) and the best-F1 thresholds calibrated on validation (``calibrate``).

Which rows count for which output lives here: a category needs a labelled category, an exclusive group a
labelled value, a multi-label group a present label set; groups that do not apply to a row's category carry no
label. The arithmetic itself is training.metrics's."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from model.inference import Predictions, shelf_embedding
from schemas.taxonomy import CATEGORY_GROUP, Taxonomy
from training.calibration import calibrate_exclusive, calibrate_multilabel
from training.data import LabelledImages
from training.metrics import (
    average_precision,
    confusion_matrix,
    f1_scores,
    multilabel_metrics,
    per_attribute_f1,
    per_class_f1,
    retrieval_metrics,
    topk_accuracy,
)

CLASS_RECALL = "class_recall/"  # metric prefix of one category's recall (its accuracy), for the gate


@dataclass
class EvalResult:
    metrics: dict[str, float]
    confusion: np.ndarray  # (C, C) category confusion matrix
    per_class_f1: np.ndarray  # (C,)
    per_label_f1: dict[str, float]  # "group/value" -> F1 (attribute values)
    predictions: Predictions


def _label_thresholds(group_name: str, values: list[str], label_thresholds: dict[str, float] | None) -> np.ndarray:
    """A multi-label group's per-value thresholds (0.5 where none was calibrated)."""
    return np.array([(label_thresholds or {}).get(f"{group_name}/{v}", 0.5) for v in values])


def group_predictions_binary(taxonomy: Taxonomy, preds: Predictions, data: LabelledImages,
                             label_thresholds: dict[str, float] | None = None
                             ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """All attribute values as one multi-hot matrix (the multi-output view): predicted, true, label names, and
    which rows carry labels for every group."""
    pred_cols, true_cols, names = [], [], []
    complete = np.ones(len(data), dtype=bool)
    for g in taxonomy.attribute_groups:
        p = preds.groups[g.name]
        t = data.groups[g.name]
        names += [f"{g.name}/{v}" for v in g.values]
        if g.exclusive:
            complete &= t >= 0
            pred_cols.append(np.eye(len(g.values), dtype=bool)[p.argmax(axis=1)])
            true_cols.append(np.eye(len(g.values), dtype=bool)[np.clip(t, 0, None)] & (t >= 0)[:, None])
        else:
            complete &= data.present[g.name]
            pred_cols.append(p >= _label_thresholds(g.name, g.values, label_thresholds)[None, :])
            true_cols.append(t > 0.5)
    if not names:
        return np.zeros((len(data), 0), bool), np.zeros((len(data), 0), bool), [], complete
    return np.concatenate(pred_cols, axis=1), np.concatenate(true_cols, axis=1), names, complete


def group_map(taxonomy: Taxonomy, preds: Predictions, data: LabelledImages) -> dict[str, float]:
    """Per-group mAP: for the category and each attribute group, the mean over its values of the average
    precision of the value's score, over the rows labelled for the group (values without a positive there are
    left out). Keys ``map/<group>``; groups nobody is labelled for: none."""
    out: dict[str, float] = {}
    # (name, exclusive, scores, targets, rows labelled for it)
    heads: list[tuple[str, bool, np.ndarray, np.ndarray, np.ndarray]] = [
        (CATEGORY_GROUP, True, preds.category, data.category, data.category >= 0)]
    for g in taxonomy.attribute_groups:
        target = data.groups[g.name]
        rows = target >= 0 if g.exclusive else np.asarray(data.present[g.name], dtype=bool)
        heads.append((g.name, g.exclusive, preds.groups[g.name], target, rows))
    for name, exclusive, scores, target, rows in heads:
        if not rows.any():
            continue
        s = np.asarray(scores)[rows]
        pos = np.eye(s.shape[1], dtype=bool)[target[rows]] if exclusive else np.asarray(target)[rows] > 0.5
        aps = [a for a in (average_precision(s[:, v], pos[:, v]) for v in range(s.shape[1])) if not math.isnan(a)]
        if aps:
            out[f"map/{name}"] = float(np.mean(aps))
    return out


def exact_match(taxonomy: Taxonomy, preds: Predictions, data: LabelledImages,
                label_thresholds: dict[str, float] | None = None) -> dict[str, float]:
    """The exact-match ratio over every output: a row counts when its category, its type and every attribute
    group it is labelled for (groups that do not apply carry no label) are all right. Rows with a category.
    Also the type accuracy (``type/accuracy``) of the model's type output."""
    rows = data.category >= 0
    if not rows.any():
        return {}
    cat_type = np.array([taxonomy.types.index(c.type) for c in taxonomy.categories])
    true_type = cat_type[np.clip(data.category, 0, None)]
    pred_type = preds.type.argmax(1) if preds.type is not None else cat_type[preds.category.argmax(1)]
    ok = (preds.category.argmax(1) == data.category) & (pred_type == true_type)
    out = {"type/accuracy": float((pred_type == true_type)[rows].mean())}
    for g in taxonomy.attribute_groups:
        t, p = data.groups[g.name], preds.groups[g.name]
        if g.exclusive:
            ok &= (t < 0) | (p.argmax(1) == t)
        else:
            thr = _label_thresholds(g.name, g.values, label_thresholds)
            ok &= ~data.present[g.name] | ((p >= thr[None, :]) == (t > 0.5)).all(axis=1)
    out["exact_match"] = float(ok[rows].mean())
    return out


def class_recall(cm: np.ndarray, taxonomy: Taxonomy) -> dict[str, float]:
    """Each category's recall, the share of its rows predicted as it: ``class_recall/<name>`` (categories
    without a row here: none). The gate refuses a candidate that loses too much on any one of them."""
    rows = cm.sum(axis=1)
    return {f"{CLASS_RECALL}{name}": float(cm[i, i] / rows[i])
            for i, name in enumerate(taxonomy.category_names) if rows[i] > 0}


def compute_metrics(taxonomy: Taxonomy, preds: Predictions, data: LabelledImages,
                    label_thresholds: dict[str, float] | None = None,
                    query_mask: np.ndarray | None = None, shelf_category_weight: float = 0.0) -> EvalResult:
    """Classification, exact-match and retrieval metrics; retrieval ranks by the shelf embedding the worker
    stores (``shelf_category_weight``, with the predicted category: test rows have no seller tags)."""
    c = len(taxonomy.categories)
    metrics: dict[str, float] = {}
    metrics.update(topk_accuracy(preds.category, data.category))
    cat_pred = preds.category.argmax(axis=1)
    metrics.update(f1_scores(cat_pred, data.category, c))
    cm = confusion_matrix(cat_pred, data.category, c)
    metrics.update(class_recall(cm, taxonomy))
    for g in taxonomy.attribute_groups:
        t = data.groups[g.name]
        if g.exclusive and (t >= 0).any():
            metrics[f"{g.name}/accuracy"] = float((preds.groups[g.name].argmax(1) == t)[t >= 0].mean())
    metrics.update(group_map(taxonomy, preds, data))
    metrics.update(exact_match(taxonomy, preds, data, label_thresholds))
    pred_bin, true_bin, names, complete = group_predictions_binary(taxonomy, preds, data, label_thresholds)
    per_label: dict[str, float] = {}
    if names and complete.any():
        metrics.update({f"attr/{k}": v for k, v in multilabel_metrics(pred_bin[complete], true_bin[complete]).items()})
        per_label = dict(zip(names, per_attribute_f1(pred_bin[complete], true_bin[complete]).tolist(), strict=True))
    ids = data.item_ids
    if (ids >= 0).any():
        q = query_mask if query_mask is not None else np.zeros(len(data), bool)
        if q.any() and (~q).any():
            e = shelf_embedding(preds.embedding, preds.category.argmax(1), c, shelf_category_weight)
            metrics.update(retrieval_metrics(e[q], ids[q], e[~q], ids[~q],
                                             query_category=data.category[q], gallery_category=data.category[~q]))
    return EvalResult(metrics, cm, per_class_f1(cm), per_label, preds)


def calibrate(taxonomy: Taxonomy, preds: Predictions, data: LabelledImages
              ) -> tuple[dict[str, float], dict[str, float]]:
    """Group thresholds and per-label thresholds (best F1 on this validation data)."""
    thresholds: dict[str, float] = {}
    label_thresholds: dict[str, float] = {}
    t, per = calibrate_exclusive(preds.category, data.category, taxonomy.category_names, CATEGORY_GROUP)
    thresholds[CATEGORY_GROUP] = t
    label_thresholds.update(per)
    for g in taxonomy.attribute_groups:
        if g.exclusive:
            t, per = calibrate_exclusive(preds.groups[g.name], data.groups[g.name], g.values, g.name)
        else:
            rows = data.present[g.name]
            t, per = calibrate_multilabel(preds.groups[g.name][rows], data.groups[g.name][rows], g.values, g.name)
        thresholds[g.name] = t
        label_thresholds.update(per)
    return thresholds, label_thresholds
