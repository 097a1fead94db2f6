"""Events other teams produce onto Kafka: new/edited listings and human corrections."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

SCHEMA_VERSION: Final = 1
MAX_IMAGES = 12


def _storable(text: str) -> str:
    # Postgres text and jsonb cannot hold U+0000; refusing it here sends the event to the dead-letter topic
    # with this reason instead of failing the database write (lone surrogates never get this far: the
    # JSON parser and pydantic's str refuse them)
    if "\x00" in text:
        raise ValueError("contains a NUL character (U+0000), which no store can hold")
    return text


# any free text of an event: no NUL (the JSON Schema says so with a pattern, for producers)
Text = Annotated[str, AfterValidator(_storable), Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})]
Id = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")]
GroupName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
TagText = Annotated[Text, StringConstraints(min_length=1, max_length=128, strip_whitespace=True)]
ImageUri = Annotated[Text, StringConstraints(min_length=1, max_length=2048)]


class _Strict(BaseModel):
    # extra="forbid": a misspelt field is an error, not silently dropped data
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ListingEvent(_Strict):
    """A listing was created or edited. Any tag the seller left out may be filled by the model."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Id | None = Field(default=None, description="producer's id; defaults to listing_id + content hash")
    listing_id: Id
    seller_id: Id
    title: Text = Field(default="", max_length=300)
    description: Text = Field(default="", max_length=5000)
    locale: str = Field(default="en", pattern=r"^[a-z]{2}(-[A-Z]{2})?$")
    images: list[ImageUri] = Field(min_length=1, max_length=MAX_IMAGES,
                                   description="s3://bucket/key, https://host/path, or a local path when enabled")
    category: TagText | None = Field(default=None, description="seller-given category, if any")
    attributes: dict[GroupName, TagText] = Field(default_factory=dict, max_length=32,
                                                 description="seller-given attribute values by group")
    deleted: bool = Field(default=False, description="listing removed or sold: drop it from similar items")


class CorrectionEvent(_Strict):
    """A person corrected one tag of a listing; used as a training label and written as source=corrected."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Id
    listing_id: Id
    group: GroupName = Field(description="'category' or an attribute group name")
    old_value: TagText | None = None
    new_value: TagText
    corrected_by: Id
    corrected_at: datetime
