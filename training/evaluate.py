"""Evaluation of a model on a labelled image set: predictions, metrics, calibrated thresholds."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.checkpoint import load_model, read_manifest
from model.inference import Predictions, mixed_precision_dtype, outputs_to_predictions, resolve_device, shelf_embedding
from model.network import MultitaskModel
from schemas.manifest import ModelManifest
from schemas.taxonomy import CATEGORY_GROUP, Taxonomy, load_taxonomy
from training.calibration import calibrate_exclusive, calibrate_multilabel
from training.config import TrainConfig
from training.data import LabelledImages, Split, TorchImages
from training.metrics import (
    confusion_matrix,
    f1_scores,
    multilabel_metrics,
    per_attribute_f1,
    per_class_f1,
    retrieval_metrics,
    topk_accuracy,
)
from training.prepare import DATASETS, EvaluationSet, evaluation_set
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
        type=np.concatenate([p.type for p in parts]),
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


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one label: the mean precision at the rank of each positive (NaN without positives)."""
    positive = np.asarray(positive, dtype=bool)
    if not positive.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = positive[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def group_map(taxonomy: Taxonomy, preds: Predictions, data: LabelledImages) -> dict[str, float]:
    """Per-group mAP (seed 002's evaluation): for the category and each attribute group, the mean over its
    values of the average precision of the value's score, over the rows labelled for the group (values
    without a positive there are left out). Keys ``map/<group>``; groups nobody is labelled for: none."""
    out: dict[str, float] = {}
    heads = [(CATEGORY_GROUP, True, preds.category, data.category, None)]
    heads += [(g.name, g.exclusive, preds.groups[g.name], data.groups[g.name], data.present.get(g.name))
              for g in taxonomy.attribute_groups]
    for name, exclusive, scores, target, present in heads:
        rows = target >= 0 if exclusive else np.asarray(present, dtype=bool)
        if not rows.any():
            continue
        s = np.asarray(scores)[rows]
        pos = (np.eye(s.shape[1], dtype=bool)[target[rows]] if exclusive else np.asarray(target)[rows] > 0.5)
        aps = [average_precision(s[:, v], pos[:, v]) for v in range(s.shape[1])]
        aps = [a for a in aps if not math.isnan(a)]
        if aps:
            out[f"map/{name}"] = float(np.mean(aps))
    return out


def exact_match(taxonomy: Taxonomy, preds: Predictions, data: LabelledImages,
                label_thresholds: dict[str, float] | None = None) -> dict[str, float]:
    """Seed 004's exact-match ratio over every output: a row counts when its category, its type and every
    attribute group it is labelled for (n/a groups carry no label) are all right. Rows with a category.
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
            thr = np.array([(label_thresholds or {}).get(f"{g.name}/{v}", 0.5) for v in g.values])
            ok &= ~data.present[g.name] | ((p >= thr[None, :]) == (t > 0.5)).all(axis=1)
    out["exact_match"] = float(ok[rows].mean())
    return out


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
        per_label = dict(zip(names, per_attribute_f1(pred_bin[complete], true_bin[complete]).tolist()))
    ids = data.item_ids
    if (ids >= 0).any():
        q = query_mask if query_mask is not None else np.zeros(len(data), bool)
        if q.any() and (~q).any():
            e = shelf_embedding(preds.embedding, preds.category.argmax(1), len(taxonomy.categories),
                                shelf_category_weight)
            metrics.update(retrieval_metrics(e[q], ids[q], e[~q], ids[~q],
                                             query_category=data.category[q], gallery_category=data.category[~q]))
    return EvalResult(metrics, cm, per_class_f1(cm), per_label, preds)


CLASS_RECALL = "class_recall/"  # metric prefix of one category's recall (its accuracy), for the gate


def class_recall(cm: np.ndarray, taxonomy: Taxonomy) -> dict[str, float]:
    """Each category's recall, the share of its rows predicted as it: ``class_recall/<name>`` (categories
    without a row here: none). The gate refuses a candidate that loses too much on any one of them."""
    rows = cm.sum(axis=1)
    return {f"{CLASS_RECALL}{name}": float(cm[i, i] / rows[i])
            for i, name in enumerate(taxonomy.category_names) if rows[i] > 0}


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


# ---------------------------------------------------------------------------------------------------
# Evaluation sets: which fixed rows a model's numbers were measured on.

EVAL_SPLIT = "test"


class EvalSetError(ValueError):
    """Two models cannot be compared (different datasets, taxonomies or evaluation sets), or a model's
    evaluation set cannot be built."""


def split_fingerprint(split: Split, data_dir: Path | str | None = None) -> str:
    """sha256 of a split's rows in order: every label, the query mask, and the photos themselves
    (in-memory sets: all pixels; file references: the path relative to ``data_dir`` and the crop box, so
    the same files at another mount point give the same fingerprint)."""
    d = split.data
    h = hashlib.sha256()
    h.update(f"rows={len(d)}".encode())
    h.update(np.ascontiguousarray(split.query, dtype=bool).tobytes())
    for name, arr in (("category", d.category), ("item_ids", d.item_ids),
                      *((f"group/{k}", d.groups[k]) for k in sorted(d.groups)),
                      *((f"present/{k}", d.present[k]) for k in sorted(d.present))):
        arr = np.ascontiguousarray(arr)
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
        h.update(arr.tobytes())
    if d.images.dtype == np.uint8:
        h.update(f"pixels:{d.images.shape}".encode())
        h.update(np.ascontiguousarray(d.images).tobytes())
    else:
        for ref in d.images:
            if isinstance(ref, np.ndarray):  # an in-memory photo among file references
                h.update(ref.tobytes())
                continue
            path, box = ref
            rel = os.path.relpath(path, data_dir) if data_dir is not None else str(path)
            h.update(f"{Path(rel).as_posix()}|{box}\n".encode())
    return h.hexdigest()


def eval_set_id(source: TrainConfig | ModelManifest | Path | str, taxonomy: Taxonomy | None = None,
                test: Split | None = None) -> str:
    """A stable identifier of a fixed evaluation set: ``"<dataset>:<taxonomy name>:test:<digest>"``, the
    digest being the first 16 hex of sha256(taxonomy sha256, dataset, split, the test rows' fingerprint).
    Same rows, labels and taxonomy: same id; anything else: another id.

    ``source``: a TrainConfig (with ``taxonomy``, default ``load_taxonomy(cfg.taxonomy)``, and ``test``, the
    split already built — e.g. ``prepare_data(cfg, taxonomy).test`` in training — else it is built here);
    a ModelManifest (the id it records; raises LookupError if it records none); or a model directory (the
    id its manifest records, else its evaluation set is rebuilt from its training config and hashed)."""
    if isinstance(source, ModelManifest):
        stored = str(getattr(source, "eval_set", "") or "")
        if not stored:
            raise LookupError(f"the manifest of {source.model_version} records no evaluation set id; "
                              "measure the model directory (enrich evaluate)")
        return stored
    if isinstance(source, (str, Path)):
        manifest = read_manifest(source)
        stored = str(getattr(manifest, "eval_set", "") or "")
        if stored:
            return stored
        cfg = evaluation_config(source, manifest=manifest)
        return eval_set_id(cfg, manifest.taxonomy)
    cfg = source
    taxonomy = taxonomy if taxonomy is not None else load_taxonomy(cfg.taxonomy)
    if test is None:
        test = evaluation_set(cfg, taxonomy).split
    h = hashlib.sha256()
    h.update(f"{taxonomy.sha256()}|{cfg.dataset}|{EVAL_SPLIT}|".encode())
    h.update(split_fingerprint(test, cfg.data_dir).encode())
    return f"{cfg.dataset}:{taxonomy.name}:{EVAL_SPLIT}:{h.hexdigest()[:16]}"


@dataclass(frozen=True)
class EvalSetParts:
    dataset: str
    taxonomy: str
    split: str
    digest: str


def parse_eval_set_id(text: str) -> EvalSetParts:
    dataset, sep, rest = (text or "").partition(":")
    parts = rest.rsplit(":", 2)
    if not sep or len(parts) != 3 or not all((dataset, *parts)):
        raise ValueError(f"not an evaluation set id: {text!r} (expected dataset:taxonomy:split:digest)")
    return EvalSetParts(dataset, *parts)


def same_eval_set(a_id: str | None, b_id: str | None) -> bool:
    """True only when both ids are known and identical: numbers measured on them may be compared."""
    return bool(a_id) and bool(b_id) and a_id == b_id


def eval_set_mismatch(a_id: str | None, b_id: str | None, a_name: str = "candidate",
                      b_name: str = "active model") -> str | None:
    """Why numbers measured on ``a_id`` and ``b_id`` must not be compared (None: they may be)."""
    if same_eval_set(a_id, b_id):
        return None
    if not a_id or not b_id:
        missing = [n for n, i in ((a_name, a_id), (b_name, b_id)) if not i]
        return (f"no evaluation set recorded for the {' and the '.join(missing)}; re-measure both on the "
                "same set (enrich promote --reevaluate)")
    try:
        a, b = parse_eval_set_id(a_id), parse_eval_set_id(b_id)
    except ValueError:
        return f"measured on different evaluation sets ({a_id} vs {b_id})"
    if a.dataset != b.dataset:
        what = f"different datasets ({a_name}: {a.dataset}, {b_name}: {b.dataset})"
    elif a.taxonomy != b.taxonomy:
        what = f"different taxonomies ({a_name}: {a.taxonomy}, {b_name}: {b.taxonomy})"
    else:
        what = f"different rows or taxonomy versions of {a.dataset} ({a_id} vs {b_id})"
    return f"measured on {what}; the gate compares numbers measured on one evaluation set only"


# ---------------------------------------------------------------------------------------------------
# Which dataset a saved model was trained for, and its evaluation configuration.

# the bundled taxonomies and the dataset each was made for (a model recording no dataset)
_TAXONOMY_DATASET = {"fashion-mnist": "fmnist-shop", "deepfashion": "deepfashion"}
# the training-config fields that decide the fixed evaluation set (a retraining job's too: training.jobs)
EVAL_FIELDS = ("dataset", "data_dir", "taxonomy", "seed", "test_items", "test_photos_per_item",
                "catalogue_source", "image_size")  # the last two: the catalogue's test photos


def training_config(model_dir: Path | str) -> dict | None:
    """The configuration a model was trained with, as its training report recorded it (None: no report)."""
    path = Path(model_dir) / "report" / "metrics.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text()).get("config")
    except (ValueError, AttributeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def model_dataset(model_dir: Path | str, manifest: ModelManifest | None = None) -> str | None:
    """The dataset a saved model was trained for: its manifest's ``dataset`` where it records one, else its
    training report's, else the dataset its (bundled) taxonomy was made for; None when none says."""
    manifest = manifest or read_manifest(model_dir)
    recorded = str(getattr(manifest, "dataset", "") or "")
    if recorded:
        return recorded
    trained = training_config(model_dir) or {}
    if trained.get("dataset"):
        return str(trained["dataset"])
    return _TAXONOMY_DATASET.get(manifest.taxonomy.name)


def evaluation_config(model_dir: Path | str, base: TrainConfig | None = None, *,
                      manifest: ModelManifest | None = None, **overrides) -> TrainConfig:
    """The configuration of a saved model's fixed evaluation set: its dataset, and (unless ``base`` gives
    them) the data directory, seed, test_items and test_photos_per_item it was trained with. ``overrides``
    (None values ignored) win. Raises EvalSetError when the dataset is unknown or has no reader, or when
    ``base`` names another dataset than the model was trained for."""
    manifest = manifest or read_manifest(model_dir)
    dataset = model_dataset(model_dir, manifest)
    if dataset is None and base is None:
        raise EvalSetError(
            f"model {manifest.model_version} was trained for taxonomy {manifest.taxonomy.name!r} and records no "
            "dataset (no 'dataset' in its manifest, no report/metrics.json config): its evaluation set would "
            "be the taxonomy's own labelled set, which only a model trained with the catalogue reader "
            f"(dataset 'catalogue') records; readers: {', '.join(DATASETS)})")
    if base is not None and dataset is not None and base.dataset != dataset:
        raise EvalSetError(f"model {manifest.model_version} was trained for {dataset!r}; cannot measure it on "
                           f"{base.dataset!r}")
    if base is not None:
        cfg = base
    else:
        trained = training_config(model_dir) or {}
        fields = {k: trained[k] for k in EVAL_FIELDS if k in trained and k != "data_dir"}
        if trained.get("data_dir"):
            fields["data_dir"] = Path(trained["data_dir"])
        cfg = replace(TrainConfig(), **fields)
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if dataset is not None:
        cfg = replace(cfg, dataset=dataset)
    if cfg.dataset not in DATASETS:
        raise EvalSetError(
            f"model {manifest.model_version} was trained for dataset {cfg.dataset!r} (taxonomy "
            f"{manifest.taxonomy.name!r}): there is no reader for that labelled set (not even the catalogue reader; "
            f"readers: {', '.join(DATASETS)})")
    return cfg


# ---------------------------------------------------------------------------------------------------
# Measuring saved models.

@dataclass
class ModelEvaluation:
    model_version: str
    dataset: str
    taxonomy: str
    eval_set: str  # eval_set_id of the rows measured
    metrics: dict[str, float]  # keyed like the manifest's ("test/…", "eval/…")


def _measure(model_dir, cfg: TrainConfig, ev: EvaluationSet, eval_set: str, dev, progress: bool,
             flip_tta: bool | None, mixed_precision: bool) -> ModelEvaluation:
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
    if ev.plain is not None:
        out.update(fashion_mnist_metrics(model, preds, split, ev.plain, ev.grey, manifest.image_size, dev,
                                         mixed_precision))
    # as training records them (training.train): the registry's gate compares eval/* too
    out.update({"eval/seed": float(cfg.seed), "eval/test_rows": float(len(split.data)),
                "eval/test_photos_per_item": float(cfg.test_photos_per_item)})
    return ModelEvaluation(manifest.model_version, cfg.dataset, manifest.taxonomy.name, eval_set, out)


def evaluate_model(model_dir, cfg: TrainConfig | None = None, device: str = "auto", progress: bool = True,
                   flip_tta: bool | None = None, mixed_precision: bool = True) -> ModelEvaluation:
    """Measure a saved model on the fixed evaluation set of the dataset it was trained for (FMNIST-shop,
    or DeepFashion: Category & Attribute test + In-shop query/gallery), with its own calibrated
    thresholds. ``cfg``: the evaluation set's configuration (default: the model's, ``evaluation_config``);
    its dataset must be the model's. ``flip_tta``: override the manifest's test-time flip (None: as
    saved). ``mixed_precision``: as the worker's ENRICH_MIXED_PRECISION (False: fp32)."""
    manifest = read_manifest(model_dir)
    cfg = evaluation_config(model_dir, cfg, manifest=manifest)
    ev = evaluation_set(cfg, manifest.taxonomy)
    eval_set = eval_set_id(cfg, manifest.taxonomy, ev.split)
    return _measure(model_dir, cfg, ev, eval_set, resolve_device(device), progress, flip_tta, mixed_precision)


def evaluate_model_dir(model_dir, cfg: TrainConfig | None = None, device: str = "auto", progress: bool = True,
                       flip_tta: bool | None = None, mixed_precision: bool = True) -> dict[str, float]:
    """``evaluate_model``'s metrics only (keyed like the manifest's: "test/…")."""
    return evaluate_model(model_dir, cfg, device=device, progress=progress, flip_tta=flip_tta,
                          mixed_precision=mixed_precision).metrics


def reevaluate_for_gate(candidate_dir, active_dir=None, device: str = "auto", progress: bool = False
                        ) -> tuple[ModelEvaluation, ModelEvaluation | None]:
    """Measure the candidate and the active model on one set: the candidate's dataset's fixed evaluation
    set (its training configuration). Raises EvalSetError, measuring nothing, when the two were trained
    for different datasets or taxonomies (their numbers would not say which is better)."""
    cand_manifest = read_manifest(candidate_dir)
    cfg = evaluation_config(candidate_dir, manifest=cand_manifest)
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
    ev = evaluation_set(cfg, cand_manifest.taxonomy)
    eval_set = eval_set_id(cfg, cand_manifest.taxonomy, ev.split)
    dev = resolve_device(device)
    cand = _measure(candidate_dir, cfg, ev, eval_set, dev, progress, None, True)
    act = None
    if active_dir is not None:
        act = _measure(active_dir, cfg, ev, eval_set, dev, progress, None, True)
    return cand, act
