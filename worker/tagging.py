"""Turn model probabilities into tags: fill only what the seller left empty, respect thresholds.

Pure functions (data in, data out) so the rules are tested without a model or a database:
- a seller value is kept as it is (source=seller); the model never overwrites it;
- 'type' follows the category (seller's or predicted), never predicted on its own when the category is
  known; the model's category and type probabilities already agree (model/network.py joint_category), so
  the type of an unsure category is the sum over its categories;
- an attribute group that does not apply to the listing's category (or, without one, its type) is
  neither written nor sent to review: it is listed as not applicable (the taxonomy's applies_to);
- a prediction at or above its calibrated threshold becomes a tag (source=predicted, confidence,
  model_version); below it goes to the review queue with its top candidates instead, and the one rule that
  explains why (`review_reason`: the text contradicts the photo, no value of a multi-label group applies,
  or plainly below the threshold);
- text fusion: what the title and description name or negate (model/text.py, the vocabulary
  beside the taxonomy) reweights the image probabilities of the groups the seller left empty, before the
  threshold rule; a tag the text contributed to keeps source=predicted and carries its evidence.

Fusion rule, a calibrated prior (not a learned fusion): p'(v) ∝ p(v) · r(v), r = TEXT_LR for a value the
text names, TEXT_LR_NEG for one it negates, 1 otherwise, renormalised over an exclusive group (an odds update
per value otherwise). Why: there are no (image, text, label) triples to learn a fusion from yet (weak labels
come from this very text, so fitting on them would be circular); two constants are monotone, explainable and
leave the image calibration untouched when the text is silent. r = 10 treats a seller's word as strong but
fallible evidence (titles mention other items: "goes with black jeans"): a 50/50 group moves to 91 %, an
unsure photo (30 %) to 81 %, yet a confident photo of another value (95 % vs 1 %) keeps its value, so text
confirms and corrects unsure photos, fills what they cannot show, and never outvotes a clear photo. Both
constants can be re-estimated from corrections later: r = P(text names v | v) / P(text names v | not v).
A group the taxonomy defines but the model has no head for (the photo cannot show it) is decided from the
text alone with a uniform prior and the same rule and threshold (one named fabric of six: 10/15 = 0.67).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from model.inference import shelf_embedding
from model.text import TextMatches, load_vocabulary
from schemas.enrichment import Enrichment, ReviewItem, ReviewReason, ReviewRule, TagEvidence, TagSource, TagValue
from schemas.events import ListingEvent
from schemas.taxonomy import CATEGORY_GROUP, TYPE_GROUP, Taxonomy

TOP_CANDIDATES = 3
TEXT_LR = 10.0  # likelihood ratio of a value the listing's text names (see the module docstring)
TEXT_LR_NEG = 0.1  # … and of a value it negates ("not cotton")
TEXT_RULE = f"lr:{TEXT_LR:g}/{TEXT_LR_NEG:g}"


def combine_images(category: np.ndarray, groups: Mapping[str, np.ndarray], embedding: np.ndarray
                   ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Several photos of one listing → one prediction: mean probabilities, mean embedding re-normalised."""
    cat = category.mean(axis=0)
    grp = {g: p.mean(axis=0) for g, p in groups.items()}
    emb = embedding.astype(np.float32).mean(axis=0)
    norm = float(np.linalg.norm(emb))
    emb = emb / norm if norm > 0 else emb
    return cat, grp, emb.astype(np.float32)


def threshold_for(group: str, value: str, thresholds: Mapping[str, float],
                  label_thresholds: Mapping[str, float], default: float) -> float:
    """Per-label calibration wins over per-group, which wins over the configured default."""
    key = f"{group}/{value}"
    if key in label_thresholds:
        return float(label_thresholds[key])
    return float(thresholds.get(group, default))


def _candidates(values: list[str], probs: np.ndarray, k: int = TOP_CANDIDATES) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(values[i], round(float(probs[i]), 6)) for i in order]


def _unit(x: float) -> float:
    return round(min(max(float(x), 0.0), 1.0), 6)


def review_reason(values: list[str], probs: np.ndarray, prior: np.ndarray | None, threshold_of: Callable[[str], float],
                  named: Mapping[str, list[str]], negated: Mapping[str, list[str]], exclusive: bool = True
                  ) -> ReviewReason:
    """Why a group below its threshold goes to review: `probs` after the text, `prior` the photo's alone (None:
    text alone), `named`/`negated` the text's words per value. A text that names another value than the photo's
    top one, or rules that one out, explains the item whatever the photo's own confidence: the reviewer must
    look at both. Otherwise a multi-label group none of whose values reaches its threshold has no value that
    applies; anything else is plainly below the threshold."""
    best = int(np.argmax(probs))
    value, probability, threshold = values[best], _unit(probs[best]), _unit(threshold_of(values[best]))
    if prior is not None:
        top = int(np.argmax(prior))
        seen = values[top]
        words = {v: list(w) for v, w in named.items() if v != seen}
        against = {seen: list(negated[seen])} if seen in negated else {}
        if words or against:
            return ReviewReason(rule=ReviewRule.text_conflict, value=value, probability=probability,
                                threshold=threshold, image_value=seen, image_probability=_unit(prior[top]),
                                words=words, negated=against)
    if not exclusive and all(float(p) < threshold_of(v) for v, p in zip(values, probs, strict=True)):
        return ReviewReason(rule=ReviewRule.no_value_applies, value=value, probability=probability,
                            threshold=threshold)
    return ReviewReason(rule=ReviewRule.below_threshold, value=value, probability=probability, threshold=threshold)


def _by_type(taxonomy: Taxonomy, said: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Words that name categories, as words that name their types."""
    out: dict[str, list[str]] = {}
    for category, words in said.items():
        if category in taxonomy.category_names:
            out.setdefault(taxonomy.type_of(category), []).extend(words)
    return out


def _type_probs(taxonomy: Taxonomy, category_probs: np.ndarray) -> tuple[list[str], np.ndarray]:
    types = taxonomy.types
    out = np.zeros(len(types), dtype=np.float64)
    for i, c in enumerate(taxonomy.categories):
        out[types.index(c.type)] += float(category_probs[i])
    return types, out


def text_of(event: ListingEvent) -> str:
    return "\n".join(t for t in (event.title, event.description) if t)


def text_matches(event: ListingEvent, taxonomy: Taxonomy) -> TextMatches | None:
    """What the listing's title and description say, or None without text, vocabulary or match."""
    text = text_of(event)
    if not text:
        return None
    vocab = load_vocabulary(taxonomy)
    if vocab is None:
        return None
    found = vocab.match(text)
    return found or None


def fuse_text(values: list[str], probs: np.ndarray, named: Mapping[str, object], negated: Mapping[str, object],
              exclusive: bool = True) -> np.ndarray:
    """Image probabilities of one group reweighted by the text: p' ∝ p · r (module docstring)."""
    r = np.array([(TEXT_LR if v in named else 1.0) * (TEXT_LR_NEG if v in negated else 1.0) for v in values])
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    if exclusive:
        w = p * r
        total = float(w.sum())
        return w / total if total > 0 else p
    odds = p * r
    return odds / (odds + (1.0 - p))


def seller_tags(event: ListingEvent, taxonomy: Taxonomy) -> dict[str, TagValue]:
    """What the seller said, kept verbatim; 'type' follows a known seller category."""
    tags: dict[str, TagValue] = {}
    if event.category:
        tags[CATEGORY_GROUP] = TagValue(value=event.category, source=TagSource.seller)
        if event.category in taxonomy.category_names and TYPE_GROUP not in event.attributes:
            tags[TYPE_GROUP] = TagValue(value=taxonomy.type_of(event.category), source=TagSource.seller)
    for group, value in event.attributes.items():
        tags[group] = TagValue(value=value, source=TagSource.seller)
    return tags


def decide(event: ListingEvent, taxonomy: Taxonomy, model_version: str,
           category_probs: np.ndarray, group_probs: Mapping[str, np.ndarray],
           thresholds: Mapping[str, float], label_thresholds: Mapping[str, float],
           default_threshold: float) -> Enrichment:
    """One listing's tags and review items from its (combined) probabilities."""
    tags = seller_tags(event, taxonomy)
    review: list[ReviewItem] = []
    text = text_matches(event, taxonomy)  # None: behaviour exactly as without text fusion

    def predicted(value: str, p: float, evidence: TagEvidence | None = None) -> TagValue:
        return TagValue(value=value, source=TagSource.predicted, confidence=min(max(p, 0.0), 1.0),
                        model_version=model_version, evidence=evidence)

    def evidence_for(group: str, prior: float | None, posterior: float) -> TagEvidence | None:
        if text is None or group not in text.groups():
            return None
        return TagEvidence(words=text.found.get(group, {}), negated=text.negated.get(group, {}),
                           prior=None if prior is None else _unit(prior), posterior=_unit(posterior),
                           rule=TEXT_RULE)

    def fused(group: str, values: list[str], probs: np.ndarray, exclusive: bool = True) -> np.ndarray:
        if text is None or group not in text.groups():
            return probs
        return fuse_text(values, probs, text.found.get(group, {}), text.negated.get(group, {}), exclusive)

    def said(group: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """The text's words per value of the group (named, negated); a type's come from its categories."""
        if text is None:
            return {}, {}
        if group == TYPE_GROUP:
            return (_by_type(taxonomy, text.found.get(CATEGORY_GROUP, {})),
                    _by_type(taxonomy, text.negated.get(CATEGORY_GROUP, {})))
        return text.found.get(group, {}), text.negated.get(group, {})

    def fill(group: str, values: list[str], probs: np.ndarray, prior: np.ndarray | None = None,
             evidence_group: str | None = None, exclusive: bool = True) -> bool:
        """`prior`: the image probabilities before fusion (None with text alone); evidence from `evidence_group`."""
        def threshold_of(value: str) -> float:
            return threshold_for(group, value, thresholds, label_thresholds, default_threshold)

        best = int(np.argmax(probs))
        p = float(probs[best])
        thr = threshold_of(values[best])
        if p >= thr:
            before = None if prior is None else float(prior[best])
            tags[group] = predicted(values[best], p, evidence_for(evidence_group or group, before, p))
            return True
        reason = review_reason(values, probs, prior, threshold_of, *said(group), exclusive=exclusive)
        review.append(ReviewItem(group=group, candidates=_candidates(values, probs), threshold=thr, reason=reason))
        return False

    if CATEGORY_GROUP not in tags:
        names = taxonomy.category_names
        image_cat = np.asarray(category_probs, dtype=np.float64)
        cat_probs = fused(CATEGORY_GROUP, names, image_cat)
        if fill(CATEGORY_GROUP, names, cat_probs, image_cat) and TYPE_GROUP not in tags:
            category = tags[CATEGORY_GROUP].value
            types, tp = _type_probs(taxonomy, cat_probs)
            ctype = taxonomy.type_of(category)
            # the type of a confident category is at least as confident: it sums over sibling categories
            p_type = float(tp[types.index(ctype)])
            before = float(_type_probs(taxonomy, image_cat)[1][types.index(ctype)])
            tags[TYPE_GROUP] = predicted(ctype, p_type, evidence_for(CATEGORY_GROUP, before, p_type))
        elif TYPE_GROUP not in tags:
            # an uncertain category can still have a certain type (shirt vs. blouse: both tops)
            types, tp = _type_probs(taxonomy, cat_probs)
            fill(TYPE_GROUP, types, tp, _type_probs(taxonomy, image_cat)[1], evidence_group=CATEGORY_GROUP)

    category_tag, type_tag = tags.get(CATEGORY_GROUP), tags.get(TYPE_GROUP)
    not_applicable = [g for g in taxonomy.not_applicable(category_tag.value if category_tag else None,
                                                         type_tag.value if type_tag else None)
                      if g not in tags]
    for group in taxonomy.attribute_groups:
        if group.name in tags or group.name in not_applicable:
            continue  # the seller's value: never touched, whatever the text says; n/a: nothing to say
        if group.name in group_probs:
            image = np.asarray(group_probs[group.name], dtype=np.float64)
            fill(group.name, group.values, fused(group.name, group.values, image, group.exclusive), image,
                 exclusive=group.exclusive)
        elif text is not None and text.found.get(group.name):
            # no head for it (the photo cannot show it): the text alone, from a uniform prior
            n = len(group.values)
            uniform = np.full(n, 1.0 / n) if group.exclusive else np.full(n, 0.5)
            fill(group.name, group.values, fused(group.name, group.values, uniform, group.exclusive), None,
                 exclusive=group.exclusive)

    return Enrichment(listing_id=event.listing_id, model_version=model_version, tags=tags, review=review,
                      not_applicable=not_applicable, embedding_ref=f"{event.listing_id}@{model_version}")


def shelf_vector(enrichment: Enrichment, taxonomy: Taxonomy, embedding: np.ndarray, category_probs: np.ndarray,
                 weight: float) -> np.ndarray:
    """The listing's vector for similar items (model/inference.py shelf_embedding): its category tag
    (the seller's or the filled one) where the taxonomy knows it, else the model's most likely category."""
    names = taxonomy.category_names
    tag = enrichment.tags.get(CATEGORY_GROUP)
    index = names.index(tag.value) if tag is not None and tag.value in names else int(np.argmax(category_probs))
    return shelf_embedding(embedding[None, :], np.array([index]), len(names), weight)[0]
