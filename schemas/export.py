"""Export JSON Schema for each contract to schemas/json/ (`python -m schemas.export`)."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.enrichment import Enrichment
from schemas.events import CorrectionEvent, ListingEvent
from schemas.manifest import ModelManifest
from schemas.taxonomy import Taxonomy

JSON_DIR = Path(__file__).parent / "json"
CONTRACTS: dict[str, type[BaseModel]] = {
    "listing_event": ListingEvent,
    "correction_event": CorrectionEvent,
    "enrichment": Enrichment,
    "taxonomy": Taxonomy,
    "model_manifest": ModelManifest,
}


def render(model: type[BaseModel]) -> str:
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def export(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in CONTRACTS.items():
        path = directory / f"{name}.schema.json"
        path.write_text(render(model))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in export():
        print(p)
