"""Contracts: valid events parse, invalid ones fail naming the field, JSON Schemas match the code."""
from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import ValidationError

from schemas import CorrectionEvent, Enrichment, ListingEvent, TagValue, load_taxonomy
from schemas.events import MAX_IMAGES
from schemas.export import CONTRACTS, JSON_DIR, render

VALID = {
    "listing_id": "L-1",
    "seller_id": "S-9",
    "title": "Blue floral dress",
    "images": ["s3://photos/L-1/0.jpg"],
    "attributes": {"sleeve": "short_sleeve"},
}


def _field_of(err: ValidationError) -> list[tuple]:
    return [e["loc"] for e in err.errors()]


def test_valid_listing_defaults_missing_tags_to_none():
    ev = ListingEvent.model_validate(VALID)
    assert ev.category is None
    assert ev.attributes == {"sleeve": "short_sleeve"}
    assert ev.schema_version == 1


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"images": []}, "images"),
        ({"images": ["s3://b/k"] * (MAX_IMAGES + 1)}, "images"),
        ({"title": "x" * 301}, "title"),
        ({"description": "x" * 5001}, "description"),
        ({"listing_id": "has space"}, "listing_id"),
        ({"listing_id": "x" * 129}, "listing_id"),
        ({"schema_version": 2}, "schema_version"),
        ({"colour": "red"}, "colour"),  # unknown fields are refused, not dropped
        ({"attributes": {"Bad-Group": "x"}}, "attributes"),
    ],
)
def test_invalid_listing_names_the_field(patch, field):
    with pytest.raises(ValidationError) as info:
        ListingEvent.model_validate({**VALID, **patch})
    assert any(loc and loc[0] == field for loc in _field_of(info.value)), info.value


def test_missing_required_field_is_named():
    with pytest.raises(ValidationError) as info:
        ListingEvent.model_validate({k: v for k, v in VALID.items() if k != "seller_id"})
    assert ("seller_id",) in _field_of(info.value)


def test_correction_event_requires_who_and_when():
    ok = CorrectionEvent.model_validate({
        "event_id": "c1", "listing_id": "L-1", "group": "category", "new_value": "Dress",
        "corrected_by": "alice", "corrected_at": "2026-11-01T10:00:00Z",
    })
    assert ok.old_value is None
    with pytest.raises(ValidationError) as info:
        CorrectionEvent.model_validate({"event_id": "c1", "listing_id": "L-1", "group": "category",
                                        "new_value": "Dress"})
    assert {("corrected_by",), ("corrected_at",)} <= set(_field_of(info.value))


def test_predicted_tag_needs_confidence_and_model_version():
    TagValue(value="Dress", source="seller")
    with pytest.raises(ValidationError, match="confidence and model_version"):
        TagValue(value="Dress", source="predicted", confidence=0.9)
    e = Enrichment(listing_id="L-1", model_version="m1",
                   tags={"category": TagValue(value="Dress", source="predicted", confidence=0.9, model_version="m1")})
    assert e.tags["category"].source.value == "predicted"


def test_bundled_taxonomies_load_and_match_the_thesis():
    df = load_taxonomy("deepfashion")
    assert len(df.categories) == 50
    assert {c.type for c in df.categories} == {"top", "bottom", "full-body"}
    assert df.group_names == ["texture", "sleeve", "length", "neckline", "fabric", "fit"]
    assert sum(len(g.values) for g in df.attribute_groups) == 26
    fm = load_taxonomy("fashion-mnist")
    assert len(fm.categories) == 10 and len(fm.group("colour").values) >= 5
    assert df.sha256() != fm.sha256() and len(df.sha256()) == 64


def test_taxonomy_rejects_inconsistent_data(tmp_path):
    bad = {"name": "x", "version": 1, "types": ["top"],
           "categories": [{"name": "A", "type": "top"}, {"name": "B", "type": "shoe"}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValidationError, match="unknown types"):
        load_taxonomy(path)
    with pytest.raises(FileNotFoundError, match="bundled"):
        load_taxonomy("no-such-taxonomy")


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_checked_in_json_schema_matches_models(name):
    path = JSON_DIR / f"{name}.schema.json"
    assert path.exists(), f"run `python -m schemas.export` to create {path}"
    assert path.read_text() == render(CONTRACTS[name]), f"{path} drifted: run `python -m schemas.export`"


def test_json_schema_accepts_and_rejects_like_pydantic():
    schema = json.loads((JSON_DIR / "listing_event.schema.json").read_text())
    jsonschema.validate(VALID, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**VALID, "images": []}, schema)
