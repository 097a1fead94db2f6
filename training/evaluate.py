"""Measuring models: a model's predictions over a labelled image set (``predict_dataset``), and a saved model
measured on the fixed evaluation set of the dataset it was trained for (``evaluate_model``; both the candidate
and the active model for the gate: ``reevaluate_for_gate``). The metrics themselves: training.scores; which set
a model is measured on: training.eval_sets."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.config import Settings
from model.checkpoint import load_model
from model.inference import Predictions, mixed_precision_dtype, outputs_to_predictions, resolve_device
from model.manifest import read_manifest
from model.network import MultitaskModel
from training.config import TrainConfig
from training.data import ImageLoader, LabelledImages, Split, TorchImages
from training.eval_sets import EvalSetError, eval_set_id, model_dataset, model_eval_config
from training.metrics import topk_accuracy
from training.prepare import EvaluationSet, evaluation_set
from training.scores import compute_metrics
from training.transforms import BatchAugment, EvalTransform


def _array_batches(images: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                   batch_size: int) -> Iterator[torch.Tensor]:
    """Vectorised eval transform for in-memory uint8 photos (much faster than per-image PIL on CPU).
    Same size: identical to Predictor.preprocess; otherwise antialiased bilinear like PIL's resize."""
    plain = BatchAugment(size, mean, std, level="none")
    for i in range(0, len(images), batch_size):
        yield plain(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])))


def predict_dataset(model: MultitaskModel, data: LabelledImages, image_size: int, device: torch.device,
                    batch_size: int = 256, progress: bool = False,
                    loader: ImageLoader | None = None, mixed_precision: bool = True) -> Predictions:
    """Predictions for every row, in the worker's numerics (the Predictor's autocast rule). ``loader``: reads a
    row's image reference (sets of image files)."""
    batches: Iterator[torch.Tensor]
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
        type=np.concatenate([p.type for p in parts]),
    )


def fashion_mnist_metrics(model: MultitaskModel, preds: Predictions, test: Split, plain: np.ndarray,
                          grey: LabelledImages, image_size: int, device: torch.device,
                          mixed_precision: bool = True) -> dict[str, float]:
    """Category top-k of the FMNIST-shop test's plain renderings (``test_plain/``, from ``preds``) and of
    the same test images as published, grey (``test_grey/``: what published Fashion-MNIST figures use)."""
    grey_preds = predict_dataset(model, grey, image_size, device, mixed_precision=mixed_precision)
    out = {f"test_plain/{k}": v for k, v in topk_accuracy(preds.category[plain], test.data.category[plain]).items()}
    out.update({f"test_grey/{k}": v for k, v in topk_accuracy(grey_preds.category, grey.category).items()})
    return out


# ---- saved models --------------------------------------------------------------------------------------

@dataclass
class ModelEvaluation:
    model_version: str
    dataset: str
    taxonomy: str
    eval_set: str  # eval_set_id of the rows measured
    metrics: dict[str, float]  # keyed like the manifest's ("test/…", "eval/…")


def _measure(model_dir: Path | str, cfg: TrainConfig, ev: EvaluationSet, eval_set: str, dev: torch.device,
             progress: bool, flip_tta: bool | None, mixed_precision: bool) -> ModelEvaluation:
    model, manifest = load_model(model_dir)
    model = model.to(dev)
    if flip_tta is not None:
        model.flip_tta = flip_tta
    split = ev.split
    preds = predict_dataset(model, split.data, manifest.image_size, dev, progress=progress, loader=ev.loader,
                            mixed_precision=mixed_precision)
    res = compute_metrics(manifest.taxonomy, preds, split.data, manifest.label_thresholds, query_mask=split.query,
                          shelf_category_weight=manifest.shelf_category_weight)
    out = {f"test/{k}": v for k, v in res.metrics.items() if not math.isnan(v)}
    if ev.plain is not None and ev.grey is not None:
        out.update(fashion_mnist_metrics(model, preds, split, ev.plain, ev.grey, manifest.image_size, dev,
                                         mixed_precision))
    # as training records them (training.train): the registry's gate compares eval/* too
    out.update({"eval/seed": float(cfg.seed), "eval/test_rows": float(len(split.data)),
                "eval/test_photos_per_item": float(cfg.test_photos_per_item)})
    return ModelEvaluation(manifest.model_version, cfg.dataset, manifest.taxonomy.name, eval_set, out)


def evaluate_model(model_dir: Path | str, cfg: TrainConfig | None = None, device: str = "auto",
                   progress: bool = True, flip_tta: bool | None = None, mixed_precision: bool = True,
                   settings: Settings | None = None) -> ModelEvaluation:
    """Measure a saved model on the fixed evaluation set of the dataset it was trained for (FMNIST-shop,
    or DeepFashion: Category & Attribute test + In-shop query/gallery), with its own calibrated
    thresholds. ``cfg``: the evaluation set's configuration (default: the model's, ``model_eval_config``);
    its dataset must be the model's. ``flip_tta``: override the manifest's test-time flip (None: as
    saved). ``mixed_precision``: as the worker's ENRICH_MIXED_PRECISION (False: fp32). ``settings``: where the
    dataset needs them (the catalogue's database and image loader: training.prepare.evaluation_set)."""
    manifest = read_manifest(model_dir)
    cfg = model_eval_config(model_dir, cfg, manifest=manifest)
    ev = evaluation_set(cfg, manifest.taxonomy, settings)
    eval_set = eval_set_id(cfg, manifest.taxonomy, ev.split)
    return _measure(model_dir, cfg, ev, eval_set, resolve_device(device), progress, flip_tta, mixed_precision)


def evaluate_model_dir(model_dir: Path | str, cfg: TrainConfig | None = None, device: str = "auto",
                       progress: bool = True, flip_tta: bool | None = None, mixed_precision: bool = True,
                       settings: Settings | None = None) -> dict[str, float]:
    """``evaluate_model``'s metrics only (keyed like the manifest's: "test/…")."""
    return evaluate_model(model_dir, cfg, device=device, progress=progress, flip_tta=flip_tta,
                          mixed_precision=mixed_precision, settings=settings).metrics


def reevaluate_for_gate(candidate_dir: Path | str, active_dir: Path | str | None = None, device: str = "auto",
                        progress: bool = False, settings: Settings | None = None
                        ) -> tuple[ModelEvaluation, ModelEvaluation | None]:
    """Measure the candidate and the active model on one set: the candidate's dataset's fixed evaluation
    set (its training configuration). Raises EvalSetError, measuring nothing, when the two were trained
    for different datasets or taxonomies (their numbers would not say which is better). ``settings``: as
    ``evaluate_model``'s."""
    cand_manifest = read_manifest(candidate_dir)
    cfg = model_eval_config(candidate_dir, manifest=cand_manifest)
    if active_dir is not None:
        act_manifest = read_manifest(active_dir)
        act_dataset = model_dataset(active_dir, act_manifest)
        if act_dataset is not None and act_dataset != cfg.dataset:
            raise EvalSetError(
                f"cannot compare {cand_manifest.model_version} with the active {act_manifest.model_version}: "
                f"trained for different datasets ({cfg.dataset} vs {act_dataset})")
        if act_manifest.taxonomy_sha256 != cand_manifest.taxonomy_sha256:
            raise EvalSetError(
                f"cannot compare {cand_manifest.model_version} with the active {act_manifest.model_version}: "
                f"trained for different taxonomies ({cand_manifest.taxonomy.name} v{cand_manifest.taxonomy.version} "
                f"vs {act_manifest.taxonomy.name} v{act_manifest.taxonomy.version})")
    ev = evaluation_set(cfg, cand_manifest.taxonomy, settings)
    eval_set = eval_set_id(cfg, cand_manifest.taxonomy, ev.split)
    dev = resolve_device(device)
    cand = _measure(candidate_dir, cfg, ev, eval_set, dev, progress, None, True)
    act = None
    if active_dir is not None:
        act = _measure(active_dir, cfg, ev, eval_set, dev, progress, None, True)
    return cand, act
