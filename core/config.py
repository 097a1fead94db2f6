"""Settings from the environment (prefix ENRICH_) via pydantic-settings; secrets only from there."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENRICH_", env_file=None, extra="ignore")

    # Storage. Empty database_url → embedded Postgres under data_dir (no services to configure).
    database_url: SecretStr | None = Field(default=None, description="postgresql://… ; empty = embedded")
    data_dir: Path = Field(default=Path(".enrich"), description="embedded Postgres, models, reports")
    db_pool_size: int = Field(default=4, ge=1, le=64)

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    listings_topic: str = "listings"
    corrections_topic: str = "corrections"
    dlq_topic: str = "listings.dlq"
    consumer_group: str = "enrich-intake"
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1000, description="consumer group session timeout")
    kafka_heartbeat_interval_ms: int = Field(default=3_000, ge=100, description="consumer heartbeat interval")

    # Celery
    celery_broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    celery_result_backend: str | None = None
    gpu_queue: str = "gpu"
    max_queue_depth: int = Field(default=1000, ge=1, description="intake pauses above this many queued tasks")
    task_max_retries: int = Field(default=4, ge=0, le=20, description="retries for transient faults (host down)")
    retry_backoff_s: float = Field(default=5.0, gt=0, description="first retry delay; doubles per retry")
    max_event_bytes: int = Field(default=256 * 1024, ge=1024, description="larger Kafka events go to the DLQ")
    pending_sweep_after_s: float = Field(default=1800.0, gt=0, description="re-enqueue listings still pending "
                                         "this long after their last change (lost task, retries spent)")
    pending_sweep_every_s: float = Field(default=600.0, gt=0, description="how often beat runs that sweep")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Prometheus /metrics + /healthz; 0 = off")

    # S3
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None

    # Images
    allowed_hosts: list[str] = Field(default_factory=list, description="http(s) hosts images may come from")
    allow_private_networks: bool = Field(default=False, description="allow loopback/private/link-local hosts")
    allow_local_paths: bool = Field(default=False, description="allow plain file paths as image URIs")
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=1024)
    fetch_timeout_s: float = Field(default=10.0, gt=0)

    # Model and thresholds
    model_dir: Path | None = Field(default=None, description="directory with model.safetensors + manifest.json")
    default_threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="used where the manifest has none")
    batch_size: int = Field(default=32, ge=1, le=1024)
    task_listings: int = Field(default=64, ge=1, le=4096,
                               description="listing ids per Celery task (the intake's micro-batch); several "
                                           "forward batches per task let decoding overlap the model")
    device: str = Field(default="auto", description="auto, cpu or cuda[:n]")
    mixed_precision: bool = Field(default=True, description="predict under autocast where the device computes it "
                                                            "natively: fp16 on CUDA, bf16 on CPUs with AVX512-BF16 "
                                                            "or AMX (lite0 at 224 px on 2 cores: 2.0–2.7× img/s; same "
                                                            "test metrics); off: fp32")
    torch_threads: int | None = Field(default=None, ge=1, le=256,
                                      description="intra-op threads of a CPU worker; default torch's (= cores). "
                                                  "1 is faster on a busy shared host")

    # Similar items
    similar_k: int = Field(default=20, ge=1, le=1000)
    index_dir: Path | None = Field(default=None, description="faiss snapshots; default <data_dir>/index")
    index_uri: str | None = Field(default=None, description="s3://bucket/prefix: the nightly job publishes its "
                                                            "snapshots there and workers on other machines follow "
                                                            "them; empty = local index_dir only")
    index_sync_s: float = Field(default=60.0, ge=0, description="how often a worker checks ENRICH_INDEX_URI for a "
                                                                 "newer snapshot")

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
