"""Taxonomy: categories (each with a garment type) and attribute groups, loaded from data files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

TAXONOMY_DIR = Path(__file__).parent / "taxonomies"
CATEGORY_GROUP = "category"  # the tag group name under which the category is stored
TYPE_GROUP = "type"  # the garment type: its own model output, kept consistent with the category
COLOUR_GROUP = "colour"  # the attribute group "the same item in another colour" refers to
NOT_APPLICABLE = "n/a"  # how a group that does not apply to a listing's category is shown


class Category(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=64)
    type: str = Field(min_length=1, max_length=32)


class AttributeGroup(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
    exclusive: bool = Field(description="values are mutually exclusive: one softmax per group")
    values: list[str] = Field(min_length=2, max_length=256)
    applies_to: list[str] | None = Field(
        default=None, description="types or categories the group applies to (the rest are masked in "
                                  "training and shown as n/a); null: every category")


class Taxonomy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=64)
    version: int = Field(ge=1)
    types: list[str] = Field(min_length=1)
    categories: list[Category] = Field(min_length=2)
    attribute_groups: list[AttributeGroup] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Taxonomy:
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
            stray = set(g.applies_to or ()) - set(self.types) - set(names)
            if stray:
                raise ValueError(f"attribute group {g.name!r} applies to unknown types or categories: {sorted(stray)}")
        return self

    @property
    def category_names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.attribute_groups]

    @property
    def all_groups(self) -> list[str]:
        """Every tag group a listing can have: category, type and the attribute groups."""
        return [CATEGORY_GROUP, TYPE_GROUP, *self.group_names]

    def values_of(self, group: str) -> list[str] | None:
        """Every value a tag group can take; None when the taxonomy has no such group."""
        if group == CATEGORY_GROUP:
            return self.category_names
        if group == TYPE_GROUP:
            return list(self.types)
        if group in self.group_names:
            return list(self.group(group).values)
        return None

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

    def applies(self, group: str, category: str | None = None, type_: str | None = None) -> bool:
        """Whether an attribute group applies to a listing of this category (or, without one, of this type).
        Unknown category and type: it may apply. A group listing a category but not its type applies to
        that category only; a type-level question then gets True when any category of the type has it."""
        allowed = self.group(group).applies_to
        if allowed is None:
            return True
        if category is not None and category in self.category_names:
            return category in allowed or self.type_of(category) in allowed
        if type_ is not None and type_ in self.types:
            return type_ in allowed or any(c.name in allowed for c in self.categories if c.type == type_)
        return True

    def not_applicable(self, category: str | None = None, type_: str | None = None) -> list[str]:
        """Attribute groups that do not apply to this category (or type), in taxonomy order."""
        return [g.name for g in self.attribute_groups if not self.applies(g.name, category, type_)]

    def applicability(self) -> npt.NDArray[np.bool_]:
        """(C, G) bool: category c has attribute group g (training masks the loss of the rest)."""
        return np.array([[self.applies(g.name, c.name) for g in self.attribute_groups] for c in self.categories],
                        dtype=bool).reshape(len(self.categories), len(self.attribute_groups))

    def sha256(self) -> str:
        """Stable hash of the content; model manifests pin it so a model never meets a wrong taxonomy.
        Unset optional fields are left out, so adding one keeps the hashes of taxonomies without it."""
        blob = json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":"))
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
