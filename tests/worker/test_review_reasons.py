"""Every review item carries the one rule that queued it: decide() picks it from the evidence it
has, and worker.store keeps it in review_queue.reason."""
from __future__ import annotations

import numpy as np
import pytest

from schemas.enrichment import ReviewReason, ReviewRule
from schemas.events import ListingEvent
from schemas.taxonomy import Taxonomy, load_taxonomy
from worker.store import listings_to_enrich, upsert_listings, write_enrichments
from worker.tagging import decide

FM = load_taxonomy("fashion-mnist")
CATS = FM.category_names
COLOURS = FM.group("colour").values


def _event(**kw) -> ListingEvent:
    return ListingEvent(**{"listing_id": "l1", "seller_id": "s1", "images": ["x.png"], **kw})


def _probs(values: list[str], **p: float) -> np.ndarray:
    """Given probabilities for some values, the rest shared evenly."""
    rest = (1.0 - sum(p.values())) / (len(values) - len(p))
    return np.array([p.get(v.replace("/", "_").replace("-", "_"), rest) for v in values])


def _colour_item(event: ListingEvent, colour: np.ndarray, label_thresholds=None, taxonomy: Taxonomy = FM):
    enr = decide(event, taxonomy, "m1", _probs(CATS, Pullover=0.9), {"colour": colour}, {"colour": 0.7},
                 label_thresholds or {}, 0.5)
    assert "colour" not in enr.tags
    [item] = [r for r in enr.review if r.group == "colour"]
    return item


def test_a_title_naming_another_colour_than_the_photo_is_a_text_conflict_with_its_words():
    colour = _probs(COLOURS, red=0.8)
    assert "colour" in decide(_event(), FM, "m1", _probs(CATS, Pullover=0.9), {"colour": colour},
                              {"colour": 0.7}, {}, 0.5).tags  # the photo alone fills red
    item = _colour_item(_event(title="Jumper in lilac"), colour)
    r = item.reason
    assert r.rule is ReviewRule.text_conflict
    assert r.words == {"purple": ["lilac"]} and r.negated == {}
    assert r.image_value == "red" and r.image_probability == pytest.approx(0.8)
    # the text moved red down across the threshold: the top candidate is still red, now below 0.7
    assert r.value == "red" == item.candidates[0][0] and r.probability == pytest.approx(item.candidates[0][1])
    assert r.probability < r.threshold == pytest.approx(0.7)


def test_a_title_that_rules_out_the_photos_colour_is_a_text_conflict():
    r = _colour_item(_event(title="Jumper, not red"), _probs(COLOURS, red=0.8)).reason
    assert r.rule is ReviewRule.text_conflict
    assert r.negated == {"red": ["red"]} and r.words == {} and r.image_value == "red"


def test_a_plain_low_confidence_prediction_is_below_threshold_with_both_numbers():
    item = _colour_item(_event(title="Jumper"), _probs(COLOURS, red=0.62))
    assert item.reason == ReviewReason(rule=ReviewRule.below_threshold, value="red", probability=0.62,
                                       threshold=0.7)
    assert item.threshold == pytest.approx(0.7)
    # a per-label threshold is the one reported
    r = _colour_item(_event(), _probs(COLOURS, red=0.8), {"colour/red": 0.85}).reason
    assert r.rule is ReviewRule.below_threshold and r.probability == pytest.approx(0.8) and r.threshold == 0.85


def test_text_that_agrees_with_the_photo_is_no_conflict():
    r = _colour_item(_event(title="red jumper"), _probs(COLOURS, red=0.15)).reason  # red: the photo's top too
    assert r.rule is ReviewRule.below_threshold
    assert r.value == "red" and 0.15 < r.probability < 0.7  # the text raised red, not enough


def test_a_type_conflict_names_the_category_words_as_the_type_they_point_to():
    enr = decide(_event(title="Summer dress"), FM, "m1", _probs(CATS, Shirt=0.3, Pullover=0.3),
                 {"colour": _probs(COLOURS, red=0.9)}, {}, {}, 0.5)
    reasons = {r.group: r.reason for r in enr.review}
    assert reasons["category"].rule is ReviewRule.text_conflict and reasons["category"].words == {"Dress": ["dress"]}
    assert reasons["type"].rule is ReviewRule.text_conflict
    assert reasons["type"].words == {"full-body": ["dress"]} and reasons["type"].image_value == "top"


def test_a_multi_label_group_with_no_value_at_its_threshold_is_no_value_applies():
    raw = FM.model_dump(mode="json")
    for g in raw["attribute_groups"]:
        if g["name"] == "colour":
            g["exclusive"] = False
    tax = Taxonomy.model_validate(raw)
    sigmoid = np.full(len(COLOURS), 0.1)
    sigmoid[COLOURS.index("red")], sigmoid[COLOURS.index("blue")] = 0.6, 0.4
    r = _colour_item(_event(), sigmoid, taxonomy=tax).reason
    assert r.rule is ReviewRule.no_value_applies and r.value == "red" and r.probability == pytest.approx(0.6)
    # blue reaches its own (lower) threshold: red is plainly below its threshold, some value does apply
    r = _colour_item(_event(), sigmoid, {"colour/blue": 0.3}, taxonomy=tax).reason
    assert r.rule is ReviewRule.below_threshold and r.value == "red"


def test_the_stored_review_row_has_the_reason(db):
    events = [_event(listing_id="lilac", title="Jumper in lilac"), _event(listing_id="plain", title="Jumper")]
    with db.transaction():
        upsert_listings(db, events)
    items = listings_to_enrich(db, ["lilac", "plain"], "m1")
    colours = {"lilac": _probs(COLOURS, red=0.8), "plain": _probs(COLOURS, red=0.62)}
    results = [(it, decide(it.event, FM, "m1", _probs(CATS, Pullover=0.9), {"colour": colours[it.listing_id]},
                           {"colour": 0.7}, {}, 0.5), np.ones(4, np.float32)) for it in items]
    with db.transaction():
        write_enrichments(db, results, [])
    rows = dict(db.execute("SELECT listing_id, reason FROM review_queue WHERE tag_group = 'colour'").fetchall())
    assert rows["lilac"] == {"rule": "text_conflict", "value": "red", "probability": pytest.approx(0.636364),
                             "threshold": 0.7, "image_value": "red", "image_probability": 0.8,
                             "words": {"purple": ["lilac"]}, "negated": {}}
    assert ReviewReason.model_validate(rows["plain"]) == ReviewReason(
        rule=ReviewRule.below_threshold, value="red", probability=0.62, threshold=0.7)
    # a re-run that queues the same group again replaces the reason with the new one
    plain = next(r for r in results if r[0].listing_id == "plain")
    redo = decide(plain[0].event, FM, "m1", _probs(CATS, Pullover=0.9), {"colour": _probs(COLOURS, red=0.5)},
                  {"colour": 0.7}, {}, 0.5)
    with db.transaction():
        write_enrichments(db, [(plain[0], redo, plain[2])], [])
    stored = db.execute("SELECT reason FROM review_queue WHERE listing_id = 'plain' AND tag_group = 'colour'"
                        " AND resolved_at IS NULL").fetchone()[0]
    assert stored["probability"] == pytest.approx(0.5)
