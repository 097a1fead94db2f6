"""Checkpoints: safetensors weights + a JSON ModelManifest; loading checks one against the other."""
from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.backbones import list_backbones
from model.manifest import MANIFEST_FILE, ModelMismatchError, file_sha256, read_manifest
from model.network import MultitaskModel, build_model
from schemas.manifest import MANIFEST_VERSION, Lineage, ModelManifest, Normalisation
from schemas.taxonomy import Taxonomy


def git_commit(repo_dir: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def save_model(model: MultitaskModel, out_dir: Path, *, model_version: str, image_size: int,
               thresholds: dict[str, float] | None = None, label_thresholds: dict[str, float] | None = None,
               metrics: dict[str, float] | None = None, data_fingerprint: str = "",
               strategy: str = "staged", dataset: str = "", eval_set: str = "",
               lineage: Lineage | None = None) -> ModelManifest:
    """Write model.safetensors and manifest.json into out_dir; return the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"model_version": model_version})
    manifest = ModelManifest(
        manifest_version=MANIFEST_VERSION,
        model_version=model_version,
        backbone=model.backbone_name,
        embedding_dim=model.embedding_dim,
        image_size=image_size,
        normalisation=Normalisation(mean=model.mean, std=model.std),
        taxonomy=model.taxonomy,
        taxonomy_sha256=model.taxonomy.sha256(),
        thresholds=thresholds or {},
        label_thresholds=label_thresholds or {},
        metrics={k: float(v) for k, v in (metrics or {}).items()},
        data_fingerprint=data_fingerprint,
        dataset=dataset,
        eval_set=eval_set,
        lineage=lineage or Lineage(),
        strategy=strategy,
        flip_tta=model.flip_tta,
        type_head=model.type_head is not None,
        shelf_category_weight=model.shelf_category_weight,
        git_commit=git_commit(),
        weights_file=weights.name,
        weights_sha256=file_sha256(weights),
        created_at=datetime.now(UTC),
    )
    (out_dir / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    return manifest


def verify_manifest(manifest: ModelManifest, model_dir: Path, expected_taxonomy: Taxonomy | None = None) -> Path:
    """Check the manifest against itself, the code, the weights file and (optionally) a taxonomy."""
    if manifest.manifest_version != MANIFEST_VERSION:
        raise ModelMismatchError(f"manifest version {manifest.manifest_version}; this code reads {MANIFEST_VERSION}")
    if manifest.taxonomy.sha256() != manifest.taxonomy_sha256:
        raise ModelMismatchError("taxonomy_sha256 does not match the manifest's taxonomy (edited by hand?)")
    if expected_taxonomy is not None and expected_taxonomy.sha256() != manifest.taxonomy_sha256:
        raise ModelMismatchError(
            f"model was trained for taxonomy {manifest.taxonomy.name!r} v{manifest.taxonomy.version} "
            f"({manifest.taxonomy_sha256[:12]}), expected {expected_taxonomy.name!r} v{expected_taxonomy.version} "
            f"({expected_taxonomy.sha256()[:12]})")
    if manifest.backbone not in list_backbones():
        raise ModelMismatchError(f"unknown backbone {manifest.backbone!r}; this code has {list_backbones()}")
    weights = Path(model_dir) / manifest.weights_file
    if Path(manifest.weights_file).name != manifest.weights_file:
        raise ModelMismatchError(f"weights_file must be a plain file name, got {manifest.weights_file!r}")
    if not weights.is_file():
        raise FileNotFoundError(f"weights file {weights} is missing")
    if manifest.weights_sha256 and file_sha256(weights) != manifest.weights_sha256:
        raise ModelMismatchError(f"{weights.name} sha256 differs from the manifest: wrong or corrupted file")
    return weights


def load_model(model_dir: Path | str, expected_taxonomy: Taxonomy | None = None,
               map_location: str | torch.device = "cpu") -> tuple[MultitaskModel, ModelManifest]:
    """Build the model the manifest describes and load its weights (strict: every tensor must fit)."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    weights = verify_manifest(manifest, model_dir, expected_taxonomy)
    model = build_model(manifest.backbone, manifest.taxonomy, pretrained=False,
                        embedding_dim=manifest.embedding_dim, type_head=manifest.type_head)
    state = load_file(str(weights), device=str(map_location))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad_shape:
        raise ModelMismatchError(
            f"weights do not fit the {manifest.backbone} model for taxonomy {manifest.taxonomy.name!r}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]}")
    model.load_state_dict(state)
    model.flip_tta = manifest.flip_tta
    model.shelf_category_weight = manifest.shelf_category_weight
    model.eval()
    return model, manifest
