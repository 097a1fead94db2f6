"""What the worker writes per listing: every tag keeps its provenance."""
from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.events import GroupName, Id, TagText


class TagSource(str, Enum):
    seller = "seller"
    predicted = "predicted"
    corrected = "corrected"


class TagValue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: TagText
    source: TagSource
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    model_version: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _predicted_has_provenance(self) -> "TagValue":
        if self.source is TagSource.predicted and (self.confidence is None or self.model_version is None):
            raise ValueError("a predicted tag needs confidence and model_version")
        return self


class ReviewItem(BaseModel):
    """A prediction below its calibrated threshold: not written as a tag, sent to people instead."""
    model_config = ConfigDict(extra="forbid")
    group: GroupName
    candidates: list[tuple[str, float]] = Field(min_length=1, max_length=10)
    threshold: float = Field(ge=0.0, le=1.0)


class Enrichment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = 1
    listing_id: Id
    model_version: str = Field(max_length=128)
    tags: dict[GroupName, TagValue] = Field(default_factory=dict)
    review: list[ReviewItem] = Field(default_factory=list)
    embedding_ref: str | None = Field(default=None, description="'<listing_id>@<model_version>' in embeddings")
