"""Evaluation sets: which fixed rows a model's numbers were measured on.

An evaluation set is the test split of a dataset under a taxonomy, decided by a few training-config fields
(``EVAL_FIELDS``). Its id (``eval_set_id``) names it and changes with any row, label, photo or taxonomy
version, so numbers are compared only where the ids agree (``eval_set_mismatch``). ``eval_config`` gives the
evaluation set of a training configuration (a retraining job's), ``model_eval_config`` that of a saved model
(the dataset it was trained for and the fields its training report recorded)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Settings
from model.manifest import read_manifest
from schemas.manifest import ModelManifest
from schemas.taxonomy import Taxonomy, load_taxonomy
from training.config import TrainConfig, config_from_dict, saved_config
from training.data import Split
from training.prepare import DATASETS, evaluation_set

EVAL_SPLIT = "test"
# the training-config fields that decide the fixed evaluation set; the last two: the catalogue's test photos
EVAL_FIELDS = ("dataset", "data_dir", "taxonomy", "seed", "test_items", "test_photos_per_item",
               "catalogue_source", "image_size")
# the taxonomy each dataset is labelled with (the catalogue's is the marketplace's own)
DATASET_TAXONOMY = {"fmnist-shop": "fashion-mnist", "deepfashion": "deepfashion"}
# the bundled taxonomies and the dataset each was made for (for a model that records no dataset)
_TAXONOMY_DATASET = {taxonomy: dataset for dataset, taxonomy in DATASET_TAXONOMY.items()}


class EvalSetError(ValueError):
    """Two models cannot be compared (different datasets, taxonomies or evaluation sets), or a model's
    evaluation set cannot be built."""


# ---- identity ------------------------------------------------------------------------------------------

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
                test: Split | None = None, settings: Settings | None = None) -> str:
    """A stable identifier of a fixed evaluation set: ``"<dataset>:<taxonomy name>:test:<digest>"``, the
    digest being the first 16 hex of sha256(taxonomy sha256, dataset, split, the test rows' fingerprint).
    Same rows, labels and taxonomy: same id; anything else: another id.

    ``source``: a TrainConfig (with ``taxonomy``, default ``load_taxonomy(cfg.taxonomy)``, and ``test``, the
    split already built — e.g. ``prepare_data(cfg, taxonomy, settings).test`` in training — else it is built
    here, with ``settings`` where the dataset needs them: training.prepare.evaluation_set); a ModelManifest (the
    id it records; raises LookupError if it records none); or a model directory (the id its manifest records,
    else its evaluation set is rebuilt from its training config and hashed)."""
    if isinstance(source, ModelManifest):
        if not source.eval_set:
            raise LookupError(f"the manifest of {source.model_version} records no evaluation set id; "
                              "measure the model directory (enrich evaluate)")
        return source.eval_set
    if isinstance(source, (str, Path)):
        manifest = read_manifest(source)
        if manifest.eval_set:
            return manifest.eval_set
        return eval_set_id(model_eval_config(source, manifest=manifest), manifest.taxonomy, settings=settings)
    cfg = source
    taxonomy = taxonomy if taxonomy is not None else load_taxonomy(cfg.taxonomy)
    if test is None:
        test = evaluation_set(cfg, taxonomy, settings).split
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
    taxonomy, split, digest = parts
    return EvalSetParts(dataset, taxonomy, split, digest)


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


# ---- configuration -------------------------------------------------------------------------------------

def eval_config(cfg: TrainConfig) -> TrainConfig:
    """The evaluation set of a training configuration: its ``EVAL_FIELDS``, everything else the defaults —
    the test split the configuration's own training run measures (a retraining job measures the candidate and
    the active model on it)."""
    return replace(TrainConfig(), **{k: getattr(cfg, k) for k in EVAL_FIELDS})


def training_config(model_dir: Path | str) -> dict[str, Any] | None:
    """The configuration a model was trained with, as its training report recorded it, keys saved under an
    earlier name read under today's (None: no report)."""
    path = Path(model_dir) / "report" / "metrics.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text()).get("config")
    except (ValueError, AttributeError):
        return None
    return saved_config(cfg) if isinstance(cfg, dict) else None


def model_dataset(model_dir: Path | str, manifest: ModelManifest | None = None) -> str | None:
    """The dataset a saved model was trained for: its manifest's ``dataset`` where it records one, else its
    training report's, else the dataset its (bundled) taxonomy was made for; None when none says."""
    manifest = manifest or read_manifest(model_dir)
    if manifest.dataset:
        return manifest.dataset
    trained = training_config(model_dir) or {}
    if trained.get("dataset"):
        return str(trained["dataset"])
    return _TAXONOMY_DATASET.get(manifest.taxonomy.name)


def model_eval_config(model_dir: Path | str, base: TrainConfig | None = None, *,
                      manifest: ModelManifest | None = None, **overrides: Any) -> TrainConfig:
    """The configuration of a saved model's fixed evaluation set: its dataset, and (unless ``base`` gives
    them) the other ``EVAL_FIELDS`` it was trained with (``eval_config`` of the configuration its training
    report recorded; defaults where there is no report). ``overrides`` (None values ignored) win. Raises
    EvalSetError when the dataset is unknown or has no reader, or when ``base`` names another dataset than
    the model was trained for."""
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
    cfg = base if base is not None else eval_config(config_from_dict(training_config(model_dir) or {}))
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if dataset is not None:
        cfg = replace(cfg, dataset=dataset)
    if cfg.dataset not in DATASETS:
        raise EvalSetError(
            f"model {manifest.model_version} was trained for dataset {cfg.dataset!r} (taxonomy "
            f"{manifest.taxonomy.name!r}): there is no reader for that labelled set (not even the catalogue reader; "
            f"readers: {', '.join(DATASETS)})")
    return cfg
