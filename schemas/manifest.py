"""Model manifest: everything needed to load a checkpoint safely and use it correctly."""
from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from schemas.taxonomy import Taxonomy

MANIFEST_VERSION = 1


class Normalisation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Lineage(BaseModel):
    """Where a model comes from: the job that trained it, the model it started from, the corrections it learnt."""
    model_config = ConfigDict(extra="forbid")
    job: int | None = None  # the retraining job (training_jobs.id); None: trained by hand (enrich train)
    started_from: str = ""  # model_version whose weights it started from (warm start); "": fresh weights
    started_at: datetime | None = None  # when its training began: corrections received later are held out
    corrections: int = 0  # corrected labels it was trained on
    corrections_through: datetime | None = None  # the latest of them (its corrected_at)
    corrections_sha256: str = ""  # of those labels (listing, group, value), sorted
    extra_rows: int = 0  # training rows beside the dataset's (the corrected listings' photos)


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    manifest_version: int = MANIFEST_VERSION
    model_version: str = Field(min_length=1, max_length=128)
    backbone: str
    embedding_dim: int = Field(default=256, ge=8, le=4096)
    image_size: int = Field(ge=16, le=1024)
    normalisation: Normalisation
    taxonomy: Taxonomy
    taxonomy_sha256: str = Field(min_length=64, max_length=64)
    # per tag group ('category' or attribute group): confidence below which a prediction goes to review
    thresholds: dict[str, float] = Field(default_factory=dict)
    # per label where calibrated per value: "group/value" -> threshold
    label_thresholds: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    data_fingerprint: str = ""
    dataset: str = ""  # what it was trained for: fmnist-shop, deepfashion, …
    eval_set: str = ""  # the fixed evaluation set its metrics were measured on (training/eval_sets.py eval_set_id)
    lineage: Lineage = Field(default_factory=Lineage)  # with dataset, data_fingerprint and eval_set: its origin
    strategy: str = "staged"
    flip_tta: bool = False  # predictions average each photo with its mirror image (2× the compute)
    type_head: bool = False  # a head of its own predicts the garment type; false: derived from the category
    # weight of the category in the shelf embedding (model/inference.py shelf_embedding); above 0 the
    # stored embedding has embedding_dim + number of categories dimensions
    shelf_category_weight: float = Field(default=0.0, ge=0.0, lt=1.0)
    git_commit: str = ""
    weights_file: str = "model.safetensors"
    weights_sha256: str = ""
    created_at: datetime

    @property
    def shelf_embedding_dim(self) -> int:
        """Dimensions of the embedding the worker stores and shelves are ranked by."""
        return self.embedding_dim + (len(self.taxonomy.categories) if self.shelf_category_weight > 0 else 0)
