"""Taxonomy: categories (each with a garment type) and attribute groups, loaded from data files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

TAXONOMY_DIR = Path(__file__).parent / "taxonomies"
CATEGORY_GROUP = "category"  # the tag group name under which the category is stored
TYPE_GROUP = "type"  # derived from the category (seed 004's type output)


class Category(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=64)
    type: str = Field(min_length=1, max_length=32)


class AttributeGroup(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
    exclusive: bool = Field(description="values are mutually exclusive: one softmax per group")
    values: list[str] = Field(min_length=2, max_length=256)


class Taxonomy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=64)
    version: int = Field(ge=1)
    types: list[str] = Field(min_length=1)
    categories: list[Category] = Field(min_length=2)
    attribute_groups: list[AttributeGroup] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "Taxonomy":
        names = [c.name for c in self.categories]
        if len(set(names)) != len(names):
            raise ValueError("duplicate category names")
        unknown = {c.type for c in self.categories} - set(self.types)
        if unknown:
            raise ValueError(f"categories use unknown types: {sorted(unknown)}")
        groups = [g.name for g in self.attribute_groups]
        if len(set(groups)) != len(groups) or {CATEGORY_GROUP, TYPE_GROUP} & set(groups):
            raise ValueError("attribute group names must be unique and not 'category' or 'type'")
        for g in self.attribute_groups:
            if len(set(g.values)) != len(g.values):
                raise ValueError(f"duplicate values in attribute group {g.name!r}")
        return self

    @property
    def category_names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.attribute_groups]

    def group(self, name: str) -> AttributeGroup:
        for g in self.attribute_groups:
            if g.name == name:
                return g
        raise KeyError(f"unknown attribute group {name!r}; known: {self.group_names}")

    def type_of(self, category: str) -> str:
        for c in self.categories:
            if c.name == category:
                return c.type
        raise KeyError(f"unknown category {category!r}")

    def sha256(self) -> str:
        """Stable hash of the content; model manifests pin it so a model never meets a wrong taxonomy."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def load_taxonomy(name_or_path: str | Path) -> Taxonomy:
    """Load a taxonomy by bundled name (``deepfashion``, ``fashion-mnist``) or from a JSON file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TAXONOMY_DIR / f"{name_or_path}.json"
    if not path.is_file():
        bundled = sorted(p.stem for p in TAXONOMY_DIR.glob("*.json") if not p.name.endswith(".vocab.json"))
        raise FileNotFoundError(f"taxonomy {str(name_or_path)!r} not found; bundled: {bundled}")
    return Taxonomy.model_validate_json(path.read_text())
