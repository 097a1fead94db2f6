"""Contracts shared by the worker, training and other teams' producers (one source of truth)."""
from schemas.events import CorrectionEvent, ListingEvent, SCHEMA_VERSION
from schemas.enrichment import Enrichment, TagValue, TagSource
from schemas.taxonomy import AttributeGroup, Category, Taxonomy, load_taxonomy
from schemas.manifest import ModelManifest

__all__ = [
    "SCHEMA_VERSION", "ListingEvent", "CorrectionEvent", "Enrichment", "TagValue", "TagSource",
    "Taxonomy", "Category", "AttributeGroup", "load_taxonomy", "ModelManifest",
]
