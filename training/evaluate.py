"""Evaluation of a model on a labelled image set: predictions, metrics, calibrated thresholds."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.checkpoint import load_model
from model.inference import Predictions, mixed_precision_dtype, outputs_to_predictions, resolve_device
from model.network import MultitaskModel
from schemas.taxonomy import CATEGORY_GROUP, Taxonomy
from training.calibration import calibrate_exclusive, calibrate_multilabel
from training.config import TrainConfig
from training.data import LabelledImages, Split, TorchImages
from training.metrics import (confusion_matrix, f1_scores, multilabel_metrics, per_attribute_f1,
                              per_class_f1, retrieval_metrics, topk_accuracy)
from training.prepare import fmnist_shop_test, prepare_data
from training.transforms import BatchAugment, EvalTransform


@dataclass
class EvalResult:
    metrics: dict[str, float]
    confusion: np.ndarray  # (C, C) category confusion matrix
    per_class_f1: np.ndarray  # (C,)
    per_label_f1: dict[str, float]  # "group/value" -> F1 (attribute values)
    predictions: Predictions


def _array_batches(images: np.ndarray, size: int, mean, std, batch_size: int):
    """Vectorised eval transform for in-memory uint8 photos (much faster than per-image PIL on CPU).
    Same size: identical to Predictor.preprocess; otherwise antialiased bilinear like PIL's resize."""
    plain = BatchAugment(size, mean, std, level="none")
    for i in range(0, len(images), batch_size):
        yield plain(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])))


def predict_dataset(model: MultitaskModel, data: LabelledImages, image_size: int, device: torch.device,
                    batch_size: int = 256, progress: bool = False, loader=None,
                    mixed_precision: bool = True) -> Predictions:
    """Predictions for every row, in the worker's numerics (the Predictor's autocast rule)."""
    if loader is None and data.images.dtype == np.uint8:
        batches = _array_batches(data.images, image_size, model.mean, model.std, batch_size)
    else:
        ds = TorchImages(data, EvalTransform(image_size, model.mean, model.std), loader=loader)
        batches = (b["image"] for b in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0))
    was_training = model.training
    model.eval()
    parts: list[Predictions] = []
    cuda = device.type == "cuda"
    total = (len(data) + batch_size - 1) // batch_size
    amp_dtype = mixed_precision_dtype(device) if mixed_precision else None
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for x in tqdm(batches, total=total, desc="evaluate", disable=not progress, leave=False):
            x = x.to(device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
            parts.append(outputs_to_predictions(model, model.infer(x)))
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


def fashion_mnist_metrics(model: MultitaskModel, preds: Predictions, test: Split, plain: np.ndarray,
                          grey: LabelledImages, image_size: int, device: torch.device,
                          mixed_precision: bool = True) -> dict[str, float]:
    """Category top-k of the FMNIST-shop test's plain renderings (``test_plain/``, from ``preds``) and of
    the same test images as published, grey (``test_grey/``: what published Fashion-MNIST figures use)."""
    grey_preds = predict_dataset(model, grey, image_size, device, mixed_precision=mixed_precision)
    out = {f"test_plain/{k}": v for k, v in topk_accuracy(preds.category[plain], test.data.category[plain]).items()}
    out.update({f"test_grey/{k}": v for k, v in topk_accuracy(grey_preds.category, grey.category).items()})
    return out


def evaluate_model_dir(model_dir, cfg: TrainConfig, device: str = "auto", progress: bool = True,
                       flip_tta: bool | None = None, mixed_precision: bool = True) -> dict[str, float]:
    """Measure a saved model on the fixed evaluation set of ``cfg`` (a TrainConfig), with the model's
    own calibrated thresholds. Returns metrics keyed like the manifest's ("test/…"). ``flip_tta``:
    override the manifest's test-time flip (None: as saved). ``mixed_precision``: as the worker's
    ENRICH_MIXED_PRECISION (False: fp32)."""
    dev = resolve_device(device)
    model, manifest = load_model(model_dir)
    model = model.to(dev)
    if flip_tta is not None:
        model.flip_tta = flip_tta
    if cfg.dataset == "fmnist-shop":
        split, plain, grey = fmnist_shop_test(cfg, manifest.taxonomy)
        loader = None
    else:
        data = prepare_data(cfg, manifest.taxonomy)
        split, plain, grey, loader = data.test, None, None, data.loader
    preds = predict_dataset(model, split.data, manifest.image_size, dev, progress=progress, loader=loader,
                            mixed_precision=mixed_precision)
    res = compute_metrics(manifest.taxonomy, preds, split.data, manifest.label_thresholds, query_mask=split.query)
    out = {f"test/{k}": v for k, v in res.metrics.items() if not math.isnan(v)}
    if plain is not None:
        out.update(fashion_mnist_metrics(model, preds, split, plain, grey, manifest.image_size, dev, mixed_precision))
    out.update({"eval/seed": float(cfg.seed), "eval/test_rows": float(len(split.data)),
                "eval/test_photos_per_item": float(cfg.test_photos_per_item)})
    return out
