"""A saved model's manifest on disk: reading it and adding to its lineage, without loading torch (the registry,
the console and the CLI read manifests; only loading or saving weights needs the network)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from schemas.manifest import Lineage, ModelManifest

MANIFEST_FILE = "manifest.json"


class ModelMismatchError(ValueError):
    """The manifest, the weights file, the code or the expected taxonomy disagree."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(model_dir: Path | str) -> ModelManifest:
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_FILE} in {model_dir}")
    try:
        return ModelManifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise ModelMismatchError(f"{path} is not a valid model manifest: {exc}") from exc


def record_lineage(model_dir: Path | str, **facts: Any) -> ModelManifest:
    """Add what the trainer's caller knows (the job, the corrections) to a saved model's lineage, before it
    is registered. The weights and their hash stay as they are."""
    manifest = read_manifest(model_dir)
    lineage = Lineage.model_validate({**manifest.lineage.model_dump(), **facts})
    manifest = manifest.model_copy(update={"lineage": lineage})
    (Path(model_dir) / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    return manifest
