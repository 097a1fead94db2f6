"""Worker subcommands: batch, consume, corrections, worker, sweep, health.

Heavy imports (torch, celery, kafka) stay inside the commands so `enrich --help` stays fast.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from core.config import get_settings
from core.options import DatabaseUrl

log = logging.getLogger(__name__)


def _json_logs(enabled: bool) -> None:
    if enabled:
        from core.logs import use_json_logs

        use_json_logs()


def batch(
    source: Path = typer.Argument(..., help="listings.jsonl (one ListingEvent per line), a folder of *.jsonl, "
                                  "or a folder of images (one listing per image)."),
    model_dir: Path = typer.Option(None, "--model-dir", envvar="ENRICH_MODEL_DIR",
                                   help="Model directory (default: active model, else newest in <data dir>/models)."),
    local_paths: bool = typer.Option(True, "--local-paths/--no-local-paths",
                                     help="Allow image URIs that are local file paths (default: on; batch input "
                                          "is your own files)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, max=1024, help="Images per forward pass "
                                   "(default: ENRICH_BATCH_SIZE, 32)."),
    rows: int = typer.Option(40, "--rows", min=0, help="Filled tags to list in the table (default: 40)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda[:n] (default: ENRICH_DEVICE, auto)."),
    database_url: DatabaseUrl = None,
) -> None:
    """Enrich listings from files in-process (same core as the workers), and print the filled tags."""
    from rich.console import Console

    from core.db import connect, database_url as resolve
    from migrations import apply_all
    from model.inference import load_predictor
    from model.registry import model_dir_for
    from worker.batch import read_listings, render_report, run_batch
    from worker.pipeline import Enricher

    console = Console()
    settings = get_settings(allow_local_paths=local_paths, batch_size=batch_size, device=device)
    try:
        events, invalid = read_listings(source)
    except FileNotFoundError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    conn = connect(database_url or resolve(settings), autocommit=True)
    try:
        apply_all(conn)
        try:
            mdir = model_dir or model_dir_for(conn, settings.model_dir, newest_under=settings.models_dir)
        except FileNotFoundError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2)
        predictor = load_predictor(mdir, device=settings.device, mixed_precision=settings.mixed_precision)
        console.print(f"model {predictor.version} from {mdir}; {len(events)} listings from {source}")
        report = run_batch(conn, Enricher(predictor, settings), events)
        report.invalid = invalid
        render_report(report, console, max_rows=rows)
    finally:
        conn.close()


def consume(
    metrics_port: int = typer.Option(None, "--metrics-port", min=0, max=65535,
                                     help="Serve /metrics and /healthz on this port (default: ENRICH_METRICS_PORT; 0 = off)."),
    json_logs: bool = typer.Option(False, "--json-logs", help="One JSON object per log line (default: plain text)."),
) -> None:
    """Kafka intake: validate listing events, upsert them, enqueue enrichment (SIGTERM stops cleanly)."""
    from core.db import connect, database_url
    from core import metrics
    from core.celery_app import configure, queue_depth, send_enrich
    from worker.intake import Intake

    _json_logs(json_logs)
    settings = get_settings(metrics_port=metrics_port)
    configure(settings)
    url = database_url(settings)
    connect(url).close()  # one clear error line if Postgres is down
    intake = Intake(settings, lambda: connect(url, autocommit=True), lambda ids: send_enrich(ids, settings),
                    queue_depth=lambda: queue_depth(settings.gpu_queue))
    intake.install_signal_handlers()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, _health_checks(settings, url, broker=True, model=False))
    log.info("consuming %s from %s as group %s", settings.listings_topic, settings.kafka_bootstrap,
             settings.consumer_group)
    intake.run()


def corrections(
    json_logs: bool = typer.Option(False, "--json-logs", help="One JSON object per log line (default: plain text)."),
) -> None:
    """Kafka intake for human corrections: store them and make them the listings' current tags."""
    from core.db import connect, database_url
    from worker.intake import CorrectionsIntake

    _json_logs(json_logs)
    settings = get_settings()
    url = database_url(settings)
    connect(url).close()
    intake = CorrectionsIntake(settings, lambda: connect(url, autocommit=True))
    intake.install_signal_handlers()
    intake.run()


def worker(
    queues: str = typer.Option(None, "--queues", "-Q", help="Comma-separated queues (default: ENRICH_GPU_QUEUE, gpu; "
                               "use 'cpu' for the nightly reindex worker)."),
    concurrency: int = typer.Option(1, "--concurrency", "-c", min=1, help="Processes (default: 1 = one per GPU; "
                                    "more only for CPU inference on many cores)."),
    metrics_port: int = typer.Option(None, "--metrics-port", min=0, max=65535,
                                     help="Serve /metrics and /healthz on this port (default: ENRICH_METRICS_PORT; 0 = off)."),
    loglevel: str = typer.Option("INFO", "--loglevel", help="Celery log level (default: INFO)."),
    json_logs: bool = typer.Option(False, "--json-logs", help="One JSON object per log line (default: plain text)."),
    beat: bool = typer.Option(False, "--beat", help="Also run the Celery beat scheduler (nightly reindex) in this "
                              "process; run it in exactly one process (default: off)."),
) -> None:
    """Celery worker for enrichment batches (acks late, prefetch 1, model loaded once per process)."""
    settings = get_settings(metrics_port=metrics_port)
    pool = "solo" if concurrency == 1 else "prefork"
    if pool == "prefork" and settings.metrics_port:
        # the children count: prometheus_client's multiprocess mode, which it picks when first imported
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="enrich-prometheus-")
    from core import metrics
    from worker import runtime
    from core.celery_app import app, configure

    _json_logs(json_logs)
    configure(settings)
    queue_list = queues or settings.gpu_queue
    if pool == "solo" and settings.gpu_queue in queue_list.split(","):
        runtime.enricher(settings)  # solo: no fork, load now so the first batch does not wait
    if settings.metrics_port:
        from core.db import database_url

        metrics.serve(settings.metrics_port, _health_checks(settings, database_url(settings), broker=True,
                                                      model=settings.gpu_queue in queue_list.split(",")))
    app.worker_main(["worker", f"--queues={queue_list}", f"--concurrency={concurrency}", f"--pool={pool}",
                     f"--loglevel={loglevel}", "--prefetch-multiplier=1", "--without-gossip", "--without-mingle"]
                    + (["--beat"] if beat else []))


def _health_checks(settings, url: str, broker: bool, model: bool) -> dict:
    from core.db import connect

    def database() -> None:
        connect(url).close()

    def celery_broker() -> None:
        from core.celery_app import app

        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

    def model_loaded() -> None:
        from worker import runtime

        if not runtime.is_loaded():  # loaded lazily by the first task
            raise RuntimeError("model not loaded yet")

    checks = {"database": database}
    if broker:
        checks["broker"] = celery_broker
    if model:
        checks["model"] = model_loaded
    return checks


def sweep(
    older_than: float = typer.Option(None, help="seconds a listing must have been pending since its last change "
                                                "(default: ENRICH_PENDING_SWEEP_AFTER_S, 1800)."),
    database_url: DatabaseUrl = None,
) -> None:
    """Enqueue again the listings left pending (a lost task, retries spent); beat runs this every 10 min."""
    from core.db import connect
    from core.db import database_url as resolve
    from core.celery_app import configure
    from worker.tasks import sweep_pending

    settings = get_settings()
    configure(settings)
    with connect(database_url or resolve(settings), autocommit=True) as conn:
        n = sweep_pending(conn, settings, older_than)
    typer.echo(f"{n} pending listing(s) enqueued again on queue {settings.gpu_queue!r}")


def health(
    database_url: DatabaseUrl = None,
    broker: bool = typer.Option(True, "--broker/--no-broker", help="Also check the Celery broker (default: on)."),
) -> None:
    """Check that Postgres (and the Celery broker) answer; exit 0 when healthy, 1 otherwise."""
    from core.db import database_url as resolve
    from core.celery_app import configure
    from core.metrics import run_checks

    settings = get_settings()
    configure(settings)
    ok, results = run_checks(_health_checks(settings, database_url or resolve(settings), broker=broker, model=False))
    for name, result in results.items():
        typer.echo(f"{name}: {result}")
    raise typer.Exit(0 if ok else 1)


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root `enrich` app."""
    app.command("batch")(batch)
    app.command("consume")(consume)
    app.command("corrections")(corrections)
    app.command("worker")(worker)
    app.command("sweep")(sweep)
    app.command("health")(health)
