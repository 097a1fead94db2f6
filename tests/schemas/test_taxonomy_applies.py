"""Which attribute groups apply to which categories (the not-applicable groups)."""
from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError

from schemas.taxonomy import TAXONOMY_DIR, Taxonomy, load_taxonomy


def _tax(**group_extra) -> dict:
    return {"name": "t", "version": 1, "types": ["top", "footwear"],
            "categories": [{"name": "Shirt", "type": "top"}, {"name": "Boot", "type": "footwear"},
                           {"name": "Sandal", "type": "footwear"}],
            "attribute_groups": [{"name": "sleeve", "exclusive": True, "values": ["long", "short"], **group_extra},
                                 {"name": "colour", "exclusive": True, "values": ["red", "blue"]}]}


def test_a_group_applies_to_its_types_and_categories_only():
    tax = Taxonomy.model_validate(_tax(applies_to=["top", "Boot"]))
    assert tax.applies("sleeve", "Shirt") and tax.applies("sleeve", "Boot") and not tax.applies("sleeve", "Sandal")
    assert tax.not_applicable("Sandal") == ["sleeve"] and tax.not_applicable("Shirt") == []
    # by type: footwear has a category with sleeves (Boot), so the type alone does not rule it out
    assert tax.applies("sleeve", type_="footwear")
    assert tax.applicability().tolist() == [[True, True], [True, True], [False, True]]
    # unknown category and type: it may apply
    assert tax.applies("sleeve") and tax.applies("sleeve", "Kilt")


def test_unknown_names_in_applies_to_are_refused():
    with pytest.raises(ValidationError, match="unknown types or categories"):
        Taxonomy.model_validate(_tax(applies_to=["top", "Sock"]))


def test_taxonomies_without_applies_to_keep_their_hash():
    # models pin the taxonomy's hash: an optional field left unset must not change it
    path = TAXONOMY_DIR / "fashion-mnist.json"
    blob = json.dumps(json.loads(path.read_text()), sort_keys=True, separators=(",", ":"))
    assert load_taxonomy("fashion-mnist").sha256() == hashlib.sha256(blob.encode()).hexdigest()
    assert Taxonomy.model_validate(_tax(applies_to=["top"])).sha256() != Taxonomy.model_validate(_tax()).sha256()


def test_deepfashion_says_what_bottoms_lack():
    df = load_taxonomy("deepfashion")
    assert df.not_applicable("Jeans") == ["sleeve", "length", "neckline"]
    assert df.not_applicable("Skirt") == ["sleeve", "neckline"]
    assert df.not_applicable("Dress") == [] and df.not_applicable("Tee") == ["length"]
