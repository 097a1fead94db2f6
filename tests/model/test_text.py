"""Text → taxonomy values: the bundled vocabularies and the matcher's rules."""
from __future__ import annotations

import json

import pytest

from model.text import (
    Vocabulary,
    VocabularyError,
    fold,
    load_vocabulary,
    match,
    parse_vocabulary,
)
from schemas.taxonomy import TAXONOMY_DIR, load_taxonomy

DF = load_taxonomy("deepfashion")
FM = load_taxonomy("fashion-mnist")


def _vocab(groups, taxonomy=DF, negators=("not", "no", "without", "sans", "non")) -> Vocabulary:
    return Vocabulary(taxonomy, groups, negators)


@pytest.mark.parametrize("name", ["deepfashion", "fashion-mnist"])
def test_bundled_vocabularies_fit_their_taxonomy(name):
    vocab = load_vocabulary(name)
    assert vocab is not None and vocab.taxonomy_name == name
    data = json.loads((TAXONOMY_DIR / f"{name}.vocab.json").read_text())
    tax = load_taxonomy(name)
    # every category has at least one phrase; every group is the taxonomy's
    assert set(data["groups"]["category"]) == set(tax.category_names)
    assert set(data["groups"]) <= {"category", *tax.group_names}


def test_no_vocabulary_file_means_none(tmp_path):
    assert load_vocabulary(DF, tmp_path / "absent.vocab.json") is None


def test_unknown_value_or_group_is_refused():
    with pytest.raises(VocabularyError, match="fabric/'silk'"):
        _vocab({"fabric": {"silk": ["silk"]}})
    with pytest.raises(VocabularyError, match="'material'"):
        _vocab({"material": {"cotton": ["cotton"]}})
    with pytest.raises(VocabularyError, match="taxonomy"):
        parse_vocabulary({"taxonomy": "fashion-mnist", "groups": {}}, DF)


def test_languages_as_lists_or_per_language_objects():
    v = parse_vocabulary({"groups": {"fabric": {"cotton": {"en": ["cotton"], "fr": ["coton"]},
                                                "denim": ["denim"]}}}, DF)
    assert v.match("Coton et DENIM").found == {"fabric": {"cotton": ["Coton"], "denim": ["DENIM"]}}


def test_case_and_accents_are_folded_and_evidence_is_the_text_as_written():
    assert fold("Égyptien ÄRMELLOS Weiß") == "egyptien armellos weiss"
    v = _vocab({"fabric": {"cotton": ["coton égyptien"]}, "texture": {"striped": ["rayé"]}})
    m = v.match("Chemise RAYEE? non: chemise Rayé en COTON EGYPTIEN")
    assert m.found == {"texture": {"striped": ["Rayé"]}, "fabric": {"cotton": ["COTON EGYPTIEN"]}}
    assert load_vocabulary(FM).match("Robe NOIRE").found == {"category": {"Dress": ["Robe"]},
                                                           "colour": {"black": ["NOIRE"]}}


def test_plurals_match_one_way():
    v = _vocab({"category": {"Shorts": ["shorts"], "Dress": ["dress"], "Jeans": ["jeans"]},
                "sleeve": {"short_sleeve": ["short sleeve"]}, "texture": {"pleated": ["pleat"]},
                "fit": {"loose": ["baggy"]}})
    m = v.match("Two dresses with short sleeves and pleats; baggies")
    assert m.found["category"] == {"Dress": ["dresses"]}
    assert m.found["sleeve"] == {"short_sleeve": ["short sleeves"]}
    assert m.found["texture"] == {"pleated": ["pleats"]} and m.found["fit"] == {"loose": ["baggies"]}
    # the phrase "shorts" is not matched by the singular "short" ("a short dress")
    assert "Shorts" not in v.match("a short dress").found.get("category", {})
    assert v.match("denim shorts").found == {"category": {"Shorts": ["shorts"]}}


def test_substring_values_longest_phrase_wins():
    v = load_vocabulary(DF)
    m = v.match("Vintage T-shirt and a shirt, a sweatshirt")
    assert m.found["category"] == {"Tee": ["T-shirt"], "Button-Down": ["shirt"], "Sweater": ["sweatshirt"]}
    m = v.match("t-shirt")  # only a tee: "shirt" inside "t-shirt" is not a second match
    assert m.found == {"category": {"Tee": ["t-shirt"]}}
    m = v.match("Faux leather shorts, short sleeves tank top")
    assert m.found["fabric"] == {"faux": ["Faux leather"]}  # not also "leather"
    assert m.found["sleeve"] == {"short_sleeve": ["short sleeves"]}
    assert m.found["category"] == {"Shorts": ["shorts"], "Tank": ["tank top"]}  # not also "Top"


def test_multi_word_phrases_across_hyphens_and_spaces_and_two_groups():
    v = load_vocabulary(DF)
    for text in ("V-neck", "v neck", "V‑NECK"):
        assert v.match(text).found == {"neckline": {"v_neckline": [text]}}
    m = v.match("Floral maxi dress")
    assert m.found["category"] == {"Dress": ["maxi dress"]} and m.found["length"] == {"maxi_length": ["maxi dress"]}
    assert v.match("crew neck tee").found == {"neckline": {"crew_neckline": ["crew neck"]},
                                              "category": {"Tee": ["tee"]}}


def test_simple_negation():
    v = load_vocabulary(DF)
    m = v.match("Summer top, not cotton")
    assert m.negated == {"fabric": {"cotton": ["cotton"]}} and "fabric" not in m.found
    m = v.match("not 100 % cotton; denim")  # a window of words, a clause boundary ends it
    assert m.negated == {"fabric": {"cotton": ["cotton"]}} and m.found["fabric"] == {"denim": ["denim"]}
    m = v.match("Cotton, no sleeves")  # "no sleeves" is a phrase of sleeveless, not a negation
    assert m.found == {"fabric": {"cotton": ["Cotton"]}, "sleeve": {"sleeveless": ["no sleeves"]}} and not m.negated
    m = v.match("Robe sans manches, pas de coton")
    assert m.found["sleeve"] == {"sleeveless": ["sans manches"]} and m.negated == {"fabric": {"cotton": ["coton"]}}
    m = v.match("non-iron cotton shirt")  # a hyphenated negator reaches only the word it is joined to
    assert m.found["fabric"] == {"cotton": ["cotton"]} and not m.negated
    m = v.match("never worn, leather")  # "never" is not a negator (second-hand listings)
    assert m.found["fabric"] == {"leather": ["leather"]}
    m = v.match("no stains but cotton")  # "but" ends the negation
    assert m.found["fabric"] == {"cotton": ["cotton"]} and not m.negated


def test_empty_text_and_module_shorthand():
    v = load_vocabulary(DF)
    assert not v.match("") and not v.match("lovely, barely used!")
    assert match("denim", v).found == {"fabric": {"denim": ["denim"]}}
    assert [(x.group, x.value, x.negated) for x in v.match("not denim").matches] == [("fabric", "denim", True)]
