"""Model directories for the gate's tests: real saved models whose category head is pushed towards, or away
from, one category, and whose stored figures (metrics, evaluation set) a test chooses."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from model.manifest import file_sha256, read_manifest
from training.gate import CLASS_RECALL


def biased_copy(src: Path, dest: Path, version: str, category: int | None = None, shift: float = 0.0,
                metrics: dict | None = None, eval_set: str | None = None) -> Path:
    """A copy of the model directory ``src`` under another version; ``shift`` added to ``category``'s logit
    (-100: it never predicts that category, +100: it predicts nothing else); ``metrics`` and ``eval_set``
    replace the stored ones when given."""
    shutil.copytree(src, dest)
    weights = dest / "model.safetensors"
    if category is not None:
        state = load_file(str(weights))
        state["category_head.bias"][category] += shift
        save_file(state, str(weights), metadata={"model_version": version})
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.update(model_version=version, weights_sha256=file_sha256(weights))
    if metrics is not None:
        manifest["metrics"] = metrics
    if eval_set is not None:
        manifest["eval_set"] = eval_set
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def best_category(model_dir: Path) -> tuple[int, str]:
    """(index, name) of the category the model recalls best on its fixed evaluation set (stored figures)."""
    manifest = read_manifest(model_dir)
    names = manifest.taxonomy.category_names
    recall = {n: manifest.metrics.get(CLASS_RECALL + n, -1.0) for n in names}
    name = max(names, key=lambda n: recall[n])
    assert recall[name] > 0.1, f"the model recalls no category: {recall}"
    return names.index(name), name
