"""Contracts shared by the worker, training and other teams' producers (one source of truth)."""
from schemas.enrichment import Enrichment, TagSource, TagValue
from schemas.events import SCHEMA_VERSION, CorrectionEvent, ListingEvent
from schemas.manifest import ModelManifest
from schemas.taxonomy import AttributeGroup, Category, Taxonomy, load_taxonomy

__all__ = [
    "SCHEMA_VERSION", "ListingEvent", "CorrectionEvent", "Enrichment", "TagValue", "TagSource",
    "Taxonomy", "Category", "AttributeGroup", "load_taxonomy", "ModelManifest",
]
