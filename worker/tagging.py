"""Turn model probabilities into tags: fill only what the seller left empty, respect thresholds.

Pure functions (data in, data out) so the rules are tested without a model or a database:
- a seller value is kept as it is (source=seller); the model never overwrites it;
- 'type' is derived from the category (seller's or predicted), never predicted on its own when the
  category is known;
- a prediction at or above its calibrated threshold becomes a tag (source=predicted, confidence,
  model_version); below it goes to the review queue with its top candidates instead.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from schemas.enrichment import Enrichment, ReviewItem, TagSource, TagValue
from schemas.events import ListingEvent
from schemas.taxonomy import CATEGORY_GROUP, TYPE_GROUP, Taxonomy

TOP_CANDIDATES = 3


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


def _type_probs(taxonomy: Taxonomy, category_probs: np.ndarray) -> tuple[list[str], np.ndarray]:
    types = taxonomy.types
    out = np.zeros(len(types), dtype=np.float64)
    for i, c in enumerate(taxonomy.categories):
        out[types.index(c.type)] += float(category_probs[i])
    return types, out


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

    def predicted(value: str, p: float) -> TagValue:
        return TagValue(value=value, source=TagSource.predicted, confidence=min(max(p, 0.0), 1.0),
                        model_version=model_version)

    def fill(group: str, values: list[str], probs: np.ndarray) -> bool:
        best = int(np.argmax(probs))
        p = float(probs[best])
        thr = threshold_for(group, values[best], thresholds, label_thresholds, default_threshold)
        if p >= thr:
            tags[group] = predicted(values[best], p)
            return True
        review.append(ReviewItem(group=group, candidates=_candidates(values, probs), threshold=thr))
        return False

    if CATEGORY_GROUP not in tags:
        names = taxonomy.category_names
        if fill(CATEGORY_GROUP, names, category_probs) and TYPE_GROUP not in tags:
            category = tags[CATEGORY_GROUP].value
            types, tp = _type_probs(taxonomy, category_probs)
            ctype = taxonomy.type_of(category)
            # the type of a confident category is at least as confident: it sums over sibling categories
            tags[TYPE_GROUP] = predicted(ctype, float(tp[types.index(ctype)]))
        elif TYPE_GROUP not in tags:
            # an uncertain category can still have a certain type (shirt vs. blouse: both tops)
            types, tp = _type_probs(taxonomy, category_probs)
            fill(TYPE_GROUP, types, tp)

    for group in taxonomy.attribute_groups:
        if group.name in tags or group.name not in group_probs:
            continue
        fill(group.name, group.values, np.asarray(group_probs[group.name], dtype=np.float64))

    return Enrichment(listing_id=event.listing_id, model_version=model_version, tags=tags, review=review,
                      embedding_ref=f"{event.listing_id}@{model_version}")
