"""Text fusion in decide: the title and description reweight the image probabilities."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from schemas.enrichment import Enrichment, TagEvidence, TagSource, TagValue
from schemas.events import ListingEvent
from schemas.taxonomy import load_taxonomy
from worker.store import listings_to_enrich, upsert_listings, write_enrichments
from worker.tagging import TEXT_LR, TEXT_RULE, decide, fuse_text

FM = load_taxonomy("fashion-mnist")
DF = load_taxonomy("deepfashion")
CATS = FM.category_names
COLOURS = FM.group("colour").values
FABRICS = DF.group("fabric").values


def _event(**kw) -> ListingEvent:
    return ListingEvent.model_validate({"listing_id": "l1", "seller_id": "s1", "images": ["x.png"], **kw})


def _probs(values: list[str], **p: float) -> np.ndarray:
    """Given probabilities for some values, the rest shared evenly."""
    rest = (1.0 - sum(p.values())) / (len(values) - len(p))
    return np.array([p.get(v.replace(" ", "_").replace("/", "_").replace("-", "_"), rest) for v in values])


def _fm(event: ListingEvent, cat: np.ndarray, colour: np.ndarray) -> Enrichment:
    return decide(event, FM, "m1", cat, {"colour": colour}, {}, {}, 0.5)


def test_without_text_or_without_a_match_decide_is_unchanged():
    cat, colour = _probs(CATS, Dress=0.45), _probs(COLOURS, red=0.7)
    plain = _fm(_event(), cat, colour)
    for ev in (_event(title="Lovely, barely used!", description="Smoke-free home."), _event(title="  ")):
        assert _fm(ev, cat, colour) == plain
    assert all(t.evidence is None for t in plain.tags.values())


def test_seller_values_are_never_overridden_by_text():
    ev = _event(title="Red dress", description="not blue", category="Coat", attributes={"colour": "blue"})
    enr = _fm(ev, _probs(CATS, Dress=0.4), _probs(COLOURS, red=0.45))
    assert enr.tags["category"] == TagValue(value="Coat", source=TagSource.seller)
    assert enr.tags["type"] == TagValue(value="top", source=TagSource.seller)
    assert enr.tags["colour"] == TagValue(value="blue", source=TagSource.seller)
    assert not enr.review
    with pytest.raises(ValidationError, match="only a predicted tag"):
        TagValue(value="blue", source=TagSource.seller,
                 evidence=TagEvidence(words={"blue": ["blue"]}, posterior=1.0, rule=TEXT_RULE))


def test_text_confirms_an_unsure_photo_and_the_tag_carries_its_evidence():
    colour = _probs(COLOURS, red=0.4)  # below the 0.5 threshold on its own: would go to review
    assert "colour" not in _fm(_event(), _probs(CATS, Dress=0.9), colour).tags
    enr = _fm(_event(title="Robe ROUGE", description="Red dress, size M"), _probs(CATS, Dress=0.9), colour)
    tag = enr.tags["colour"]
    assert tag.value == "red" and tag.source is TagSource.predicted and tag.model_version == "m1"
    expected = 0.4 * TEXT_LR / (0.4 * TEXT_LR + 0.6)
    assert tag.confidence == pytest.approx(expected)
    ev = tag.evidence
    assert ev is not None and ev.kind == "text" and ev.rule == TEXT_RULE
    assert ev.words == {"red": ["ROUGE", "Red"]} and ev.negated == {}
    assert ev.prior == pytest.approx(0.4) and ev.posterior == pytest.approx(expected, abs=1e-6)
    category = enr.tags["category"].evidence
    assert category is not None and category.words == {"Dress": ["Robe", "dress"]}
    assert not enr.review


def test_text_corrects_an_unsure_photo_and_type_follows_the_fused_category():
    cat = _probs(CATS, Shirt=0.4, Dress=0.3)
    enr = _fm(_event(title="Summer dress"), cat, _probs(COLOURS, black=0.9))
    assert enr.tags["category"].value == "Dress" and enr.tags["category"].evidence.prior == pytest.approx(0.3)
    assert enr.tags["type"].value == "full-body" and enr.tags["type"].evidence is not None
    assert enr.tags["type"].confidence == pytest.approx(enr.tags["category"].confidence)
    assert enr.tags["colour"].value == "black" and enr.tags["colour"].evidence is None  # text silent on colour


def test_a_confident_photo_keeps_its_value():
    enr = _fm(_event(title="goes well with red shoes"), _probs(CATS, Bag=0.9), _probs(COLOURS, black=0.95))
    assert enr.tags["colour"].value == "black"
    assert enr.tags["colour"].confidence < 0.95 and enr.tags["colour"].evidence.words == {"red": ["red"]}


def test_negation_moves_probability_away():
    fabric = _probs(FABRICS, cotton=0.55, denim=0.35)
    enr = decide(_event(title="Jacket, not cotton"), DF, "m2", _probs(DF.category_names, Jacket=0.8),
                 {"fabric": fabric}, {}, {}, 0.5)
    tag = enr.tags["fabric"]
    assert tag.value == "denim" and tag.evidence.negated == {"cotton": ["cotton"]} and tag.evidence.words == {}
    assert tag.evidence.prior == pytest.approx(0.35) and tag.confidence > 0.5


def test_groups_the_model_has_no_head_for_are_filled_from_text_alone():
    cat = _probs(DF.category_names, Jacket=0.8)
    enr = decide(_event(title="Faux leather jacket", description="not cotton"), DF, "m2", cat, {}, {}, {}, 0.5)
    tag = enr.tags["fabric"]
    n = len(FABRICS)
    assert tag.value == "faux" and tag.source is TagSource.predicted and tag.model_version == "m2"
    assert tag.confidence == pytest.approx(TEXT_LR / (TEXT_LR + (n - 2) + 0.1), abs=1e-6)
    assert tag.evidence.prior is None and tag.evidence.words == {"faux": ["Faux leather"]}
    assert tag.evidence.negated == {"cotton": ["cotton"]}
    # two named values: not sure enough, goes to review; only a negation: nothing at all
    enr = decide(_event(title="cotton and denim"), DF, "m2", cat, {}, {}, {}, 0.5)
    assert "fabric" not in enr.tags and [r.group for r in enr.review] == ["fabric"]
    enr = decide(_event(title="not cotton"), DF, "m2", cat, {}, {}, {}, 0.5)
    assert "fabric" not in enr.tags and not enr.review
    # the seller's fabric stays, and a group the text does not name is not invented
    enr = decide(_event(title="leather", attributes={"fabric": "denim"}), DF, "m2", cat, {}, {}, {}, 0.5)
    assert enr.tags["fabric"] == TagValue(value="denim", source=TagSource.seller) and "texture" not in enr.tags


def test_fuse_text_rule():
    values = ["a", "b", "c"]
    out = fuse_text(values, np.array([0.5, 0.3, 0.2]), {"b": ["b"]}, {"a": ["not a"]})
    w = np.array([0.5 * 0.1, 0.3 * TEXT_LR, 0.2])
    assert out == pytest.approx(w / w.sum())
    multi = fuse_text(values, np.array([0.5, 0.3, 0.2]), {"b": ["b"]}, {}, exclusive=False)
    assert multi[0] == pytest.approx(0.5) and multi[1] == pytest.approx(3 / (3 + 0.7))
    assert fuse_text(values, np.array([0.5, 0.3, 0.2]), {}, {}) == pytest.approx([0.5, 0.3, 0.2])


def test_evidence_is_stored_with_the_tag_and_validates(db):
    ev = _event(listing_id="t1", title="Robe rouge")
    enr = _fm(ev, _probs(CATS, Dress=0.9), _probs(COLOURS, red=0.4))
    assert Enrichment.model_validate_json(enr.model_dump_json()) == enr
    with db.transaction():
        upsert_listings(db, [ev])
    (item,) = listings_to_enrich(db, ["t1"], "m1")
    with db.transaction():
        write_enrichments(db, [(item, enr, np.ones(2, np.float32))], [])
    rows = dict(db.execute("SELECT tag_group, evidence FROM listing_tags WHERE listing_id = 't1'").fetchall())
    assert rows["colour"]["words"] == {"red": ["rouge"]} and rows["colour"]["prior"] == pytest.approx(0.4)
    assert rows["colour"]["posterior"] == pytest.approx(enr.tags["colour"].confidence)
    assert rows["category"]["words"] == {"Dress": ["Robe"]}
