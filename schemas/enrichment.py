"""What the worker writes per listing: every tag keeps its provenance."""
from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.events import GroupName, Id, TagText


class TagSource(StrEnum):
    seller = "seller"
    predicted = "predicted"
    corrected = "corrected"


class TagEvidence(BaseModel):
    """Why the listing's text changed a predicted tag: the words, and the value's probability before/after."""
    model_config = ConfigDict(extra="forbid")
    kind: Literal["text"] = "text"
    words: dict[str, list[str]] = Field(default_factory=dict,
                                        description="value → the words of title/description that named it")
    negated: dict[str, list[str]] = Field(default_factory=dict,
                                          description="value → the words that ruled it out ('not cotton')")
    prior: float | None = Field(default=None, ge=0.0, le=1.0,
                                description="the image model's probability of the tag's value; null: text alone")
    posterior: float = Field(ge=0.0, le=1.0, description="after fusion with the text (the tag's confidence)")
    rule: str = Field(max_length=64, description="fusion rule and constants, e.g. 'lr:10/0.1'")


class TagValue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: TagText
    source: TagSource
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    model_version: str | None = Field(default=None, max_length=128)
    evidence: TagEvidence | None = Field(default=None, description="set when the text contributed to a prediction")

    @model_validator(mode="after")
    def _predicted_has_provenance(self) -> TagValue:
        if self.source is TagSource.predicted and (self.confidence is None or self.model_version is None):
            raise ValueError("a predicted tag needs confidence and model_version")
        if self.evidence is not None and self.source is not TagSource.predicted:
            raise ValueError("only a predicted tag carries evidence")
        return self


class ReviewRule(StrEnum):
    below_threshold = "below_threshold"  # the best guess is below the threshold of its value
    text_conflict = "text_conflict"  # the listing's text names another value than the photo's, or rules it out
    no_value_applies = "no_value_applies"  # a multi-label group: no value reaches its own threshold


class ReviewReason(BaseModel):
    """The one rule that sent a group to review, with the numbers and words behind it."""
    model_config = ConfigDict(extra="forbid")
    rule: ReviewRule
    value: TagText = Field(description="the best guess (after the text, if any): the top candidate")
    probability: float = Field(ge=0.0, le=1.0, description="its probability")
    threshold: float = Field(ge=0.0, le=1.0, description="the threshold it had to reach")
    image_value: TagText | None = Field(default=None, description="text_conflict: the photo's top value")
    image_probability: float | None = Field(default=None, ge=0.0, le=1.0,
                                            description="text_conflict: its probability from the photo alone")
    words: dict[str, list[str]] = Field(default_factory=dict,
                                        description="text_conflict: value → the words that named it")
    negated: dict[str, list[str]] = Field(default_factory=dict,
                                          description="text_conflict: the photo's value → the words ruling it out")


class ReviewItem(BaseModel):
    """A prediction the worker would not write as a tag: sent to people instead, with the reason why."""
    model_config = ConfigDict(extra="forbid")
    group: GroupName
    candidates: list[tuple[str, float]] = Field(min_length=1, max_length=10)
    threshold: float = Field(ge=0.0, le=1.0)
    reason: ReviewReason | None = Field(default=None, description="null only in items written before reasons")


class Enrichment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = 1
    listing_id: Id
    model_version: str = Field(max_length=128)
    tags: dict[GroupName, TagValue] = Field(default_factory=dict)
    review: list[ReviewItem] = Field(default_factory=list)
    not_applicable: list[GroupName] = Field(
        default_factory=list, description="attribute groups that do not apply to the listing's category (shown as "
                                          "n/a)")
    embedding_ref: str | None = Field(default=None, description="'<listing_id>@<model_version>' in embeddings")
