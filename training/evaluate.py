"""Evaluation of a model on a labelled image set: predictions, metrics, calibrated thresholds."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from schemas.taxonomy import Taxonomy
from training.calibration import calibrate_exclusive, calibrate_multilabel
from training.data import LabelledImages, TorchImages
from training.inference import Predictions, outputs_to_predictions
from training.metrics import (confusion_matrix, f1_scores, multilabel_metrics, per_attribute_f1,
                              per_class_f1, retrieval_metrics, topk_accuracy)
from training.model import MultitaskModel
from training.transforms import EvalTransform


@dataclass
class EvalResult:
    metrics: dict[str, float]
    confusion: np.ndarray  # (C, C) category confusion matrix
    per_class_f1: np.ndarray  # (C,)
    per_label_f1: dict[str, float]  # "group/value" -> F1 (attribute values)
    predictions: Predictions


def predict_dataset(model: MultitaskModel, data: LabelledImages, image_size: int, device: torch.device,
                    batch_size: int = 256, progress: bool = False, loader=None) -> Predictions:
    ds = TorchImages(data, EvalTransform(image_size, model.mean, model.std), loader=loader)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    was_training = model.training
    model.eval()
    parts: list[Predictions] = []
    cuda = device.type == "cuda"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
        for batch in tqdm(dl, desc="evaluate", disable=not progress, leave=False):
            x = batch["image"].to(device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
            parts.append(outputs_to_predictions(model, model(x)))
    model.train(was_training)
    return Predictions(
        category=np.concatenate([p.category for p in parts]),
        groups={g: np.concatenate([p.groups[g] for p in parts]) for g in parts[0].groups},
        embedding=np.concatenate([p.embedding for p in parts]),
    )


def group_predictions_binary(taxonomy: Taxonomy, preds: Predictions, data: LabelledImages,
                             label_thresholds: dict[str, float] | None = None
                             ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """All attribute values as one multi-hot matrix (seed 004's multi-output view): predicted, true,
    label names, and which rows carry labels for every group."""
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
            thr = np.array([(label_thresholds or {}).get(f"{g.name}/{v}", 0.5) for v in g.values])
            pred_cols.append(p >= thr[None, :])
            true_cols.append(t > 0.5)
    if not names:
        return np.zeros((len(data), 0), bool), np.zeros((len(data), 0), bool), [], complete
    return np.concatenate(pred_cols, axis=1), np.concatenate(true_cols, axis=1), names, complete


def compute_metrics(taxonomy: Taxonomy, preds: Predictions, data: LabelledImages,
                    label_thresholds: dict[str, float] | None = None,
                    query_mask: np.ndarray | None = None) -> EvalResult:
    c = len(taxonomy.categories)
    metrics: dict[str, float] = {}
    metrics.update(topk_accuracy(preds.category, data.category))
    cat_pred = preds.category.argmax(axis=1)
    metrics.update(f1_scores(cat_pred, data.category, c))
    cm = confusion_matrix(cat_pred, data.category, c)
    for g in taxonomy.attribute_groups:
        t = data.groups[g.name]
        if g.exclusive and (t >= 0).any():
            metrics[f"{g.name}/accuracy"] = float((preds.groups[g.name].argmax(1) == t)[t >= 0].mean())
    pred_bin, true_bin, names, complete = group_predictions_binary(taxonomy, preds, data, label_thresholds)
    per_label: dict[str, float] = {}
    if names and complete.any():
        metrics.update({f"attr/{k}": v for k, v in multilabel_metrics(pred_bin[complete], true_bin[complete]).items()})
        per_label = dict(zip(names, per_attribute_f1(pred_bin[complete], true_bin[complete]).tolist()))
    ids = data.item_ids
    if (ids >= 0).any():
        q = query_mask if query_mask is not None else np.zeros(len(data), bool)
        if q.any() and (~q).any():
            metrics.update(retrieval_metrics(preds.embedding[q], ids[q], preds.embedding[~q], ids[~q]))
    return EvalResult(metrics, cm, per_class_f1(cm), per_label, preds)


def calibrate(taxonomy: Taxonomy, preds: Predictions, data: LabelledImages
              ) -> tuple[dict[str, float], dict[str, float]]:
    """Group thresholds and per-label thresholds (best F1 on this validation data)."""
    from schemas.taxonomy import CATEGORY_GROUP

    thresholds, label_thresholds = {}, {}
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
