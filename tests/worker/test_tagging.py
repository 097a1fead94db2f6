"""Provenance and threshold rules on plain arrays (no model, no database)."""
from __future__ import annotations

import json
import logging

import numpy as np

from core.logs import JsonFormatter
from schemas.events import ListingEvent
from schemas.taxonomy import load_taxonomy
from worker.tagging import combine_images, decide, shelf_vector, threshold_for

TAX = load_taxonomy("fashion-mnist")
CATS = TAX.category_names
COLOURS = TAX.group("colour").values


def _event(**kw) -> ListingEvent:
    return ListingEvent.model_validate({"listing_id": "l1", "seller_id": "s1", "images": ["x.png"], **kw})


def _onehot(n: int, i: int, p: float) -> np.ndarray:
    v = np.full(n, (1 - p) / (n - 1))
    v[i] = p
    return v


def test_missing_groups_filled_with_provenance_and_type_from_category():
    enr = decide(_event(), TAX, "m1", _onehot(10, CATS.index("Dress"), 0.9),
                 {"colour": _onehot(8, COLOURS.index("red"), 0.8)}, {}, {}, 0.5)
    assert enr.tags["category"].value == "Dress" and enr.tags["category"].source.value == "predicted"
    assert enr.tags["category"].confidence == 0.9 and enr.tags["category"].model_version == "m1"
    assert enr.tags["type"].value == "full-body" and enr.tags["type"].source.value == "predicted"
    assert enr.tags["colour"].value == "red" and not enr.review


def test_seller_values_kept_never_overwritten():
    enr = decide(_event(category="Coat", attributes={"colour": "blue"}), TAX, "m1",
                 _onehot(10, CATS.index("Dress"), 0.99), {"colour": _onehot(8, 2, 0.99)}, {}, {}, 0.5)
    assert enr.tags["category"].value == "Coat" and enr.tags["category"].source.value == "seller"
    assert enr.tags["type"].value == "top" and enr.tags["type"].source.value == "seller"
    assert enr.tags["colour"].value == "blue" and enr.tags["colour"].source.value == "seller"
    assert enr.tags["colour"].confidence is None and not enr.review


def test_below_threshold_goes_to_review_with_candidates():
    probs = _onehot(8, COLOURS.index("green"), 0.4)
    enr = decide(_event(category="Coat"), TAX, "m1", _onehot(10, 0, 0.9), {"colour": probs},
                 {"colour": 0.6}, {}, 0.5)
    assert "colour" not in enr.tags
    (item,) = enr.review
    assert item.group == "colour" and item.threshold == 0.6
    assert item.candidates[0] == ("green", 0.4) and len(item.candidates) == 3


def test_label_threshold_beats_group_threshold_beats_default():
    assert threshold_for("colour", "red", {"colour": 0.7}, {"colour/red": 0.2}, 0.5) == 0.2
    assert threshold_for("colour", "blue", {"colour": 0.7}, {"colour/red": 0.2}, 0.5) == 0.7
    assert threshold_for("fit", "slim", {"colour": 0.7}, {}, 0.5) == 0.5


def test_uncertain_category_can_still_give_a_certain_type():
    probs = np.zeros(10)
    probs[CATS.index("Shirt")] = 0.45
    probs[CATS.index("T-shirt/top")] = 0.45
    probs[CATS.index("Bag")] = 0.10
    enr = decide(_event(attributes={"colour": "red"}), TAX, "m1", probs, {}, {"category": 0.6}, {}, 0.5)
    assert "category" not in enr.tags and enr.review[0].group == "category"
    assert enr.tags["type"].value == "top" and abs(enr.tags["type"].confidence - 0.9) < 1e-6


def test_combine_images_means_probs_and_renormalises_embedding():
    cat = np.array([[0.8, 0.2], [0.4, 0.6]])
    emb = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    c, g, e = combine_images(cat, {"colour": cat}, emb)
    assert np.allclose(c, [0.6, 0.4]) and np.allclose(g["colour"], [0.6, 0.4])
    assert np.isclose(np.linalg.norm(e), 1.0) and np.allclose(e, [0.7071068, 0.7071068])


def test_json_logs_carry_listing_id():
    record = logging.LogRecord("worker.pipeline", logging.INFO, __file__, 1, "listing %s failed", ("x1",), None)
    record.listing_id = "x1"
    out = json.loads(JsonFormatter().format(record))
    assert out["listing_id"] == "x1" and out["msg"] == "listing x1 failed" and out["level"] == "INFO"


DF = load_taxonomy("deepfashion")


def _df_groups(p: float = 0.95) -> dict[str, np.ndarray]:
    return {g.name: _onehot(len(g.values), 0, p) for g in DF.attribute_groups}


def test_groups_that_do_not_apply_are_neither_tagged_nor_reviewed():
    # Jeans (a bottom): sleeve, neckline and length do not apply, even when the model is sure of a value
    jeans = _onehot(len(DF.categories), DF.category_names.index("Jeans"), 0.95)
    enr = decide(_event(), DF, "m1", jeans, _df_groups(), {}, {}, 0.5)
    assert enr.tags["category"].value == "Jeans" and enr.tags["type"].value == "bottom"
    assert enr.not_applicable == ["sleeve", "length", "neckline"]
    assert not {"sleeve", "length", "neckline"} & set(enr.tags)
    assert {"texture", "fabric", "fit"} <= set(enr.tags)
    # unsure values of n/a groups do not reach the review queue either
    unsure = decide(_event(), DF, "m1", jeans, _df_groups(0.4), {}, {}, 0.5)
    assert {r.group for r in unsure.review} == {"texture", "fabric", "fit"}
    # a skirt has a length, a dress has all three
    skirt = decide(_event(category="Skirt"), DF, "m1", jeans, _df_groups(), {}, {}, 0.5)
    assert skirt.not_applicable == ["sleeve", "neckline"] and "length" in skirt.tags
    dress = decide(_event(category="Dress"), DF, "m1", jeans, _df_groups(), {}, {}, 0.5)
    assert dress.not_applicable == [] and {"sleeve", "length", "neckline"} <= set(dress.tags)


def test_not_applicable_follows_the_type_when_the_category_is_unsure_and_keeps_seller_values():
    # unsure between two bottoms: no category tag, but the type is sure, and decides applicability
    probs = np.zeros(len(DF.categories))
    probs[DF.category_names.index("Jeans")] = probs[DF.category_names.index("Chinos")] = 0.5
    enr = decide(_event(attributes={"sleeve": "long_sleeve"}), DF, "m1", probs, _df_groups(), {}, {}, 0.6)
    assert "category" not in enr.tags and enr.tags["type"].value == "bottom"
    # neckline: no bottom has one; length: skirts do; sleeve: the seller said it, kept as said
    assert enr.not_applicable == ["neckline"]
    assert enr.tags["sleeve"].value == "long_sleeve" and enr.tags["sleeve"].source.value == "seller"
    # nothing known about category or type: every group may apply
    flat = np.full(len(DF.categories), 1 / len(DF.categories))
    assert decide(_event(), DF, "m1", flat, _df_groups(), {}, {}, 0.6).not_applicable == []


def test_the_shelf_vector_uses_the_sellers_category_over_the_models():
    emb = np.full(4, 0.5, np.float32)
    probs = _onehot(10, CATS.index("Dress"), 0.9)
    sold_as_coat = decide(_event(category="Coat"), TAX, "m1", probs, {"colour": _onehot(8, 0, 0.9)}, {}, {}, 0.5)
    v = shelf_vector(sold_as_coat, TAX, emb, probs, 0.3)
    assert v.shape == (14,) and np.argmax(v[4:]) == CATS.index("Coat")
    np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-6)
    unsure = decide(_event(), TAX, "m1", _onehot(10, CATS.index("Dress"), 0.3), {"colour": _onehot(8, 0, 0.9)},
                    {}, {}, 0.5)
    assert "category" not in unsure.tags
    shelf = shelf_vector(unsure, TAX, emb, _onehot(10, CATS.index("Dress"), 0.3), 0.3)
    assert np.argmax(shelf[4:]) == CATS.index("Dress")
    assert shelf_vector(unsure, TAX, emb, probs, 0.0).shape == (4,)  # weight 0: the image embedding alone
