"""Settings from the environment (prefix ENRICH_) via pydantic-settings; secrets only from there.

`python -m core.config` prints the configuration table (`settings_table()`); the copy in
docs/configuration.md sits between `<!-- settings-table:start -->` and `<!-- settings-table:end -->` and a test
keeps the two equal.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENRICH_", env_file=None, extra="ignore")

    # Storage. Empty database_url → embedded Postgres under data_dir (no services to configure).
    database_url: SecretStr | None = Field(default=None, description="`postgresql://user:pass@host:5432/db` (secret). "
                                                                     "Empty: an embedded PostgreSQL under "
                                                                     "`<data dir>/pg`, said on stderr; consume, "
                                                                     "worker, promote, rollback and retrain use it "
                                                                     "only with `--embedded`")
    data_dir: Path = Field(default=Path(".enrich"), description="local state: embedded Postgres, models, reports, "
                                                                "index snapshots, quickstart output")
    db_pool_size: int = Field(default=4, ge=1, le=64, description="Postgres connections per process pool")

    # Kafka
    kafka_bootstrap: str = Field(default="127.0.0.1:9092", description="Kafka bootstrap servers (`host:port,…`)")
    listings_topic: str = Field(default="listings", description="topic of new and changed listings "
                                                                "(`enrich consume`)")
    corrections_topic: str = Field(default="corrections", description="topic of human tag corrections "
                                                                      "(`enrich corrections`; its dead letters go "
                                                                      "to `<topic>.dlq`)")
    dlq_topic: str = Field(default="listings.dlq", description="dead-letter topic for listing events that fail "
                                                               "validation (with the reason and the raw bytes)")
    consumer_group: str = Field(default="enrich-intake", description="Kafka consumer group of the intake "
                                                                     "(corrections use `<group>-corrections`)")
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1000, description="consumer group session timeout "
                                                                               "(ms)")
    kafka_heartbeat_interval_ms: int = Field(default=3_000, ge=100, description="consumer heartbeat interval (ms)")

    # Celery
    celery_broker_url: str = Field(default="amqp://guest:guest@127.0.0.1:5672//",
                                   description="Celery broker: RabbitMQ (`amqp://…`) or Redis (`redis://…`)")
    celery_result_backend: str | None = Field(default=None, description="Celery result backend. Empty: task "
                                                                        "results are not stored (none are needed)")
    gpu_queue: str = Field(default="gpu", description="Celery queue of enrichment tasks (`enrich worker -Q gpu`)")
    backfill_queue: str = Field(default="backfill", description="Celery queue of the catalogue backfill after a "
                                                                "promotion or rollback (GPU workers: "
                                                                "`-Q gpu,backfill`)")
    cpu_queue: str = Field(default="cpu", description="Celery queue of CPU jobs: the nightly reindex, the pending "
                                                      "sweep, beat's tick (`enrich worker -Q cpu`)")
    train_queue: str = Field(default="train", description="Celery queue of retraining jobs (a GPU worker of their "
                                                          "own: `enrich worker -Q train`)")
    beat_tick_s: float = Field(default=60.0, gt=0, description="how often beat records that it is alive (a task on "
                                                               "the cpu queue); `enrich health --beat` fails when "
                                                               "the last tick is older than three of these (s)")
    max_queue_depth: int = Field(default=1000, ge=1, description="the intake pauses while more than this many "
                                                                 "tasks wait in the queue")
    task_max_retries: int = Field(default=4, ge=0, le=20, description="retries of a task after a transient fault "
                                                                      "(image host down, database connection lost)")
    retry_backoff_s: float = Field(default=5.0, gt=0, description="first retry delay after an image host "
                                                              "was down or a reindex shard met a transient "
                                                              "fault (s); doubles per retry, up to "
                                                              "ENRICH_RETRY_BACKOFF_MAX_S")
    retry_backoff_max_s: float = Field(default=600.0, gt=0, description="longest delay between two retries of "
                                                                        "a batch whose image host is down (s)")
    max_event_bytes: int = Field(default=256 * 1024, ge=1024, description="larger Kafka events go to the "
                                                                          "dead-letter topic (bytes)")
    pending_sweep_after_s: float = Field(default=1800.0, gt=0, description="`enrich sweep` enqueues again the "
                                         "listings still pending this long after their last change (a lost task, "
                                         "retries spent); a swept listing then waits as long again (s)")
    pending_sweep_every_s: float = Field(default=600.0, gt=0, description="how often beat runs that sweep (s)")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="port of Prometheus `/metrics` and "
                                                                     "`/healthz` for `consume` and `worker`; "
                                                                     "0: off")

    # S3
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, Ceph, …). "
                                                                  "Empty: AWS S3")
    s3_region: str = Field(default="us-east-1", description="S3 region")
    aws_access_key_id: SecretStr | None = Field(default=None, description="S3 access key id (secret). Empty: "
                                                                          "boto3's own chain (`AWS_ACCESS_KEY_ID` "
                                                                          "in the environment, `~/.aws`, an "
                                                                          "instance or pod role)")
    aws_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret key (secret); used only "
                                                                              "with the key id above. Empty: "
                                                                              "boto3's own chain "
                                                                              "(`AWS_SECRET_ACCESS_KEY`, …)")

    # Images
    allowed_hosts: list[str] = Field(default_factory=list, description="JSON list of the http(s) hosts listing "
                                                                       "images may come from, e.g. "
                                                                       "`[\"img.example.com\"]` (`s3://` URIs "
                                                                       "need no entry)")
    allow_private_networks: bool = Field(default=False, description="allow image hosts on loopback, private or "
                                                                    "link-local addresses")
    allow_local_paths: bool = Field(default=False, description="read image files anywhere on this machine; files "
                                                               "under the data directory are always read")
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1024, description="larger image downloads are "
                                                                                "refused (bytes; 20 MiB)")
    max_image_pixels: int = Field(default=40_000_000, ge=1024,
                                  description="most pixels an image is decoded to (40 MP): a larger JPEG is decoded "
                                              "at the 1/2, 1/4 or 1/8 scale that fits, other larger images are "
                                              "refused before decoding")
    fetch_timeout_s: float = Field(default=10.0, gt=0, description="connect/read timeout of an image or S3 "
                                                                   "request (s)")

    # Model and thresholds
    model_dir: Path | None = Field(default=None, description="developer override: serve this directory "
                                                             "(`model.safetensors` + `manifest.json`) and ignore the "
                                                             "registry. Empty: the model the registry marks active, "
                                                             "followed as it changes")
    model_uri: str | None = Field(default=None, description="`s3://bucket/prefix` where registered models' files "
                                                            "are stored by version and sha256. Empty: "
                                                            "`<data dir>/model-store` (one machine or a shared "
                                                            "volume)")
    model_check_s: float = Field(default=10.0, ge=0, description="how often each worker process asks the registry "
                                                                 "which model is active and reports itself in "
                                                                 "worker_status (s); a new model is loaded in the "
                                                                 "background and served once loaded, between "
                                                                 "batches, with no task needed")
    keep_model_versions: int = Field(default=2, ge=1, le=20, description="model versions whose embeddings and "
                                                                         "shelves are kept, the active one "
                                                                         "included, so a rollback switches back "
                                                                         "at once")
    default_threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="confidence below which a tag goes "
                                                                              "to review instead of being filled, "
                                                                              "where the manifest has no threshold")
    batch_size: int = Field(default=32, ge=1, le=1024, description="images per forward pass")
    task_listings: int = Field(default=64, ge=1, le=4096,
                               description="listing ids per Celery task (the intake's micro-batch); several "
                                           "forward batches per task let decoding overlap the model")
    intake_linger_ms: int = Field(default=250, ge=0, le=10_000,
                                  description="how long the intake waits for more events to fill a task up to "
                                              "ENRICH_TASK_LISTINGS (ms); a full task goes at once, 0 never waits")
    device: str = Field(default="auto", description="`auto` (a GPU if there is one), `cpu` or `cuda[:n]`")
    mixed_precision: bool = Field(default=True, description="predict under autocast where the device computes it "
                                                            "natively: fp16 on CUDA, bf16 on CPUs with AVX512-BF16 "
                                                            "or AMX; `false`: fp32 (`enrich evaluate MODEL --fp32` "
                                                            "measures a model both ways)")
    torch_threads: int | None = Field(default=None, ge=1, le=256,
                                      description="intra-op threads of a CPU worker (torch, and faiss for online "
                                                  "neighbours). Empty: their default (one per core); 1 suits a "
                                                  "busy shared host")
    explain_review: bool = Field(default=False, description="workers also store a Grad-CAM heat map of each review "
                                                            "item's top candidate under `<data dir>/explanations` "
                                                            "(one machine or a shared volume), shown by the "
                                                            "console as the item's \"why\"; costs one backward "
                                                            "pass per review item")

    # Similar items
    similar_k: int = Field(default=20, ge=1, le=1000, description="neighbours kept per listing")
    reindex_shards: int = Field(default=1, ge=1, le=1024, description="shards of the nightly similar-items "
                                                                     "reindex: 1 = one process; N > 1 = a chord of "
                                                                     "N Celery tasks on the cpu queue (needs "
                                                                     "ENRICH_CELERY_RESULT_BACKEND)")
    index_dir: Path | None = Field(default=None, description="where faiss snapshots are written (nightly) and read "
                                                             "(workers' online neighbours). Empty: "
                                                             "`<data dir>/index`")
    index_uri: str | None = Field(default=None, description="`s3://bucket/prefix`: the nightly job publishes its "
                                                            "snapshots there and workers on other machines follow "
                                                            "them. Empty: only the local index directory (one "
                                                            "machine or a shared volume)")
    index_sync_s: float = Field(default=60.0, ge=0, description="how often a worker checks ENRICH_INDEX_URI for a "
                                                                 "newer snapshot (s)")
    online_delta_max: int = Field(default=200_000, ge=1, description="listings written since the last similar-items "
                                  "snapshot that each worker process holds for online neighbours (4·dim bytes "
                                  "each) before it asks for a reindex; with no snapshot at all, online neighbours "
                                  "wait for `enrich reindex` beyond it")

    # Model lifecycle: backfill after a promotion, retraining jobs, shadow evaluation
    backfill_pause_s: float = Field(default=5.0, ge=0, description="the catalogue backfill waits this long while "
                                                                   "live enrichment tasks are queued, so live "
                                                                   "traffic keeps priority (s)")
    retrain_cron: str | None = Field(default=None, description="when beat starts a retraining job, as a crontab "
                                                               "line (`minute hour day month weekday`, e.g. "
                                                               "`0 3 * * 0`). Empty: only `enrich retrain`")
    retrain_min_corrections: int = Field(default=50, ge=0, description="a scheduled retraining job is skipped "
                                                                       "(with the reason logged) when fewer "
                                                                       "corrections arrived since the last one")
    retrain_preset: str = Field(default="quick", description="training preset of retraining jobs (`enrich train "
                                                             "--help` lists them)")
    retrain_dataset: str = Field(default="fmnist-shop", description="dataset retraining jobs train on: "
                                                                    "`fmnist-shop`, `deepfashion` or `catalogue` "
                                                                    "(the marketplace's own listings; plus the "
                                                                    "corrections)")
    retrain_catalogue: str = Field(default="postgres", description="with ENRICH_RETRAIN_DATASET=catalogue: "
                                                                   "`postgres` (the listings in the database) or "
                                                                   "the path of a JSONL export")
    retrain_taxonomy: str | None = Field(default=None, description="with ENRICH_RETRAIN_DATASET=catalogue: the "
                                                                   "taxonomy (bundled name or JSON file) the "
                                                                   "catalogue's tags follow; required there")
    retrain_data_dir: Path | None = Field(default=None, description="the dataset's files for retraining jobs. "
                                                                    "Empty: the preset's default")
    retrain_task_weights: bool = Field(default=False, description="the retrain job weighs each attribute "
                                                                  "group's loss by its label count relative to "
                                                                  "the most labelled group, with a floor that "
                                                                  "lifts groups with few labels (for noisy "
                                                                  "seller labels)")
    retrain_nproc: int = Field(default=1, ge=1, le=64, description="processes a retraining job trains with "
                                                                  "(DistributedDataParallel under torchrun: one "
                                                                  "per GPU, or gloo on CPU); 1 = one process")
    job_heartbeat_s: float = Field(default=15.0, gt=0, description="how often a running training job records "
                                                                   "that it is alive (s)")
    job_stale_s: float = Field(default=180.0, gt=0, description="a running training job whose last heartbeat is "
                                                                "older than this is marked failed (its worker died) "
                                                                "(s)")
    gate_tolerance: float = Field(default=0.0, ge=0.0, le=1.0, description="the gate lets a candidate be this much "
                                                                           "worse on an overall metric than the "
                                                                           "active model")
    gate_class_margin: float = Field(default=0.05, ge=0.0, le=1.0, description="the gate refuses a candidate that "
                                                                               "loses more than this on any one "
                                                                               "category's accuracy, or on the "
                                                                               "corrections held out since the "
                                                                               "active model was trained, even "
                                                                               "when it is better overall")
    corrections_holdout: float = Field(default=0.2, ge=0.0, lt=1.0, description="share of corrected listings "
                                                                               "kept out of retraining (chosen "
                                                                               "by a hash of the listing id) so "
                                                                               "the gate measures candidates on "
                                                                               "corrections they never trained "
                                                                               "on; 0: none, and the gate uses "
                                                                               "corrections trained on")
    auto_promote: bool = Field(default=False, description="a retraining job promotes its model when it passes the "
                                                          "gate; `false`: it waits for an admin (`enrich promote`)")
    shadow_share: float = Field(default=0.1, ge=0.0, le=1.0, description="share of live listings a shadow "
                                                                         "candidate also predicts (stored apart, "
                                                                         "never as tags)")

    # Console (enrich console)
    console_host: str = Field(default="127.0.0.1", description="address `enrich console` listens on")
    console_port: int = Field(default=8080, ge=1, le=65535, description="port `enrich console` listens on")
    console_secret_key: SecretStr | None = Field(default=None, description="key that signs session cookies "
                                                                           "(secret; any long random string). Empty: "
                                                                           "a random key per process, so sessions "
                                                                           "end when the console restarts")
    console_https: bool = Field(default=False, description="the console is served over TLS (directly or behind a "
                                                           "proxy): session cookies get the Secure flag")
    console_lease_s: float = Field(default=300.0, gt=0, description="how long a review item stays reserved for "
                                                                    "the reviewer who opened it (s)")
    review_order: Literal["fifo", "gain"] = Field(default="fifo", description="which open review item the "
                                                  "console shows next: `fifo`, the oldest; `gain`, the one whose "
                                                  "answer settles the most (uncertain, with many uncertain look-"
                                                  "alikes; near-duplicates of one already asked come later)")
    review_reprioritise_s: float = Field(default=600.0, gt=0, description="with the `gain` order: how often beat "
                                                                          "ranks the open review items, as `enrich "
                                                                          "review-order` does (s); a new item is "
                                                                          "ranked by its own uncertainty until then")
    console_session_idle_s: float = Field(default=3600.0, gt=0, description="a console session unused this long "
                                                                            "ends (s)")
    console_session_max_s: float = Field(default=43200.0, gt=0, description="a console session ends this long "
                                                                           "after its sign-in, used or not (s)")
    console_login_checks: int = Field(default=2, ge=1, description="password checks the console runs at once "
                                                                   "(each holds 64 MiB for argon2id); more wait")
    console_login_address_failures: int = Field(default=20, ge=1,
                                                description="failed sign-ins from one address, any names, "
                                                            "within 10 minutes before it is refused for a while")

    @field_validator("retrain_cron")
    @classmethod
    def _five_cron_fields(cls, value: str | None) -> str | None:
        if value and len(value.split()) != 5:
            raise ValueError(f"a crontab line has 5 fields (minute hour day month weekday), got {value!r}")
        return value or None

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


def get_settings(**overrides: Any) -> Settings:
    """Read the environment now, then apply a command's options (None = not given).

    Only the edges call this (a CLI command, a process start); library code receives the Settings it
    needs, so a test builds one instead of patching a global.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    return Settings().model_copy(update=given) if given else Settings()


def _default_text(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "*(empty)*"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def settings_table() -> str:
    """The README's configuration table (Markdown), one row per setting in `Settings`, in declaration order."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{Settings.model_config['env_prefix']}{name.upper()}` | {_default_text(field)} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
