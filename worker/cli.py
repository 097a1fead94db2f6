"""Worker subcommands: batch, consume, corrections, worker, sweep, review-order, backfill, health.

Modules that import torch, celery or kafka are imported inside the commands so `enrich --help` stays fast, and
so is prometheus_client (core.metrics, worker.runtime): it picks its multiprocess mode when first imported,
which `enrich worker` sets up first.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from core.config import Settings, get_settings
from core.db import connect
from core.db import database_url as resolve
from core.logs import use_json_logs
from core.options import DatabaseUrl, Embedded
from migrations import apply_all
from worker.review_priority import reprioritise

log = logging.getLogger(__name__)
SOLO_PREFETCH = 2  # tasks a one-process worker holds: the running one and the next (both redelivered on a crash)


def _json_logs(enabled: bool) -> None:
    if enabled:
        use_json_logs()


def batch(
    source: Path = typer.Argument(..., help="listings.jsonl (one ListingEvent per line), a folder of *.jsonl, "
                                  "or a folder of images (one listing per image)."),
    model_dir: Path | None = typer.Option(None, "--model-dir", envvar="ENRICH_MODEL_DIR", help="Model directory "
                                          "(default: active model, else newest in <data dir>/models)."),
    local_paths: bool = typer.Option(True, "--local-paths/--no-local-paths",
                                     help="Allow image URIs that are local file paths (default: on; batch input "
                                          "is your own files)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, max=1024, help="Images per forward pass "
                                          "(default: ENRICH_BATCH_SIZE, 32)."),
    rows: int = typer.Option(40, "--rows", min=0, help="Filled tags to list in the table (default: 40)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda[:n] (default: ENRICH_DEVICE, auto)."),
    database_url: DatabaseUrl = None,
) -> None:
    """Enrich listings from files in-process (same core as the workers), and print the filled tags.

    Exit status 1 when some rows were invalid, refused by the database or failed to enrich (each is listed
    with its line or listing and the reason; the other rows are enriched)."""
    # lazy: these import torch (model.registry: celery)
    from model.inference import load_predictor
    from model.registry import model_dir_for
    from worker.batch import read_listings, render_report, run_batch
    from worker.pipeline import Enricher

    console = Console()
    settings = get_settings(allow_local_paths=local_paths, batch_size=batch_size, device=device)
    try:
        events, invalid, origins = read_listings(source)
    except FileNotFoundError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    conn = connect(database_url or resolve(settings), autocommit=True)
    try:
        apply_all(conn)
        try:
            mdir = model_dir or model_dir_for(conn, settings.model_dir, newest_under=settings.models_dir)
        except FileNotFoundError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        predictor = load_predictor(mdir, device=settings.device, mixed_precision=settings.mixed_precision)
        console.print(f"model {predictor.version} from {mdir}; {len(events)} listings from {source}")
        report = run_batch(conn, Enricher(predictor, settings), events, origins=origins)
        report.invalid = invalid
        render_report(report, console, max_rows=rows)
    finally:
        conn.close()
    if not report.complete:
        raise typer.Exit(1)


def consume(
    metrics_port: int | None = typer.Option(None, "--metrics-port", min=0, max=65535, help="Serve /metrics and "
                                            "/healthz on this port (default: ENRICH_METRICS_PORT; 0 = off)."),
    json_logs: bool = typer.Option(False, "--json-logs", help="One JSON object per log line (default: plain text)."),
    embedded: Embedded = False,
) -> None:
    """Kafka intake: validate listing events, upsert them, enqueue enrichment (SIGTERM stops cleanly)."""
    from core import metrics  # lazy: prometheus_client (see the module docstring)
    from core.celery_app import configure, queue_depth, send_enrich  # lazy: celery
    from worker.intake import Intake  # lazy: kafka

    _json_logs(json_logs)
    settings = get_settings(metrics_port=metrics_port)
    url = resolve(settings, embedded_ok=embedded)
    configure(settings)
    connect(url).close()  # one clear error line if Postgres is down
    crash = os.environ.get("ENRICH_TEST_CRASH_BEFORE_COMMIT")  # the fault suite's kill point, never set in production
    intake = Intake(settings, lambda: connect(url, autocommit=True), lambda ids: send_enrich(ids, settings),
                    queue_depth=lambda: queue_depth(settings.gpu_queue),
                    crash_before_commit=int(crash) if crash else None)
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
    from worker.intake import CorrectionsIntake  # lazy: kafka

    _json_logs(json_logs)
    settings = get_settings()
    url = resolve(settings)
    connect(url).close()
    intake = CorrectionsIntake(settings, lambda: connect(url, autocommit=True))
    intake.install_signal_handlers()
    intake.run()


def worker(
    queues: str | None = typer.Option(None, "--queues", "-Q", help="Comma-separated queues (default: "
                                      "ENRICH_GPU_QUEUE, gpu; use 'cpu' for the nightly reindex worker)."),
    concurrency: int = typer.Option(1, "--concurrency", "-c", min=1, help="Processes (default: 1 = one per GPU; "
                                    "more only for CPU inference on many cores)."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", min=0, max=65535, help="Serve /metrics and "
                                            "/healthz on this port (default: ENRICH_METRICS_PORT; 0 = off)."),
    loglevel: str = typer.Option("INFO", "--loglevel", help="Celery log level (default: INFO)."),
    json_logs: bool = typer.Option(False, "--json-logs", help="One JSON object per log line (default: plain text)."),
    beat: bool = typer.Option(False, "--beat", help="Also run the Celery beat scheduler (nightly reindex, sweep, "
                              "its own tick) in this process, its schedule in <data dir>/celerybeat-schedule; run "
                              "it in exactly one process; /healthz then checks the tick too (default: off)."),
    hostname: str | None = typer.Option(None, "--hostname", "-n", help="Celery node name, unique per broker (default: "
                                        "<queues>-<pid>@<host>, so several workers can run on one host)."),
    embedded: Embedded = False,
) -> None:
    """Celery worker (acks late; one task waiting beside the running one); gpu/backfill workers load the model
    once per process and follow the registry on a timer; every worker reports itself in worker_status."""
    settings = get_settings(metrics_port=metrics_port)
    if not embedded:
        resolve(settings, embedded_ok=False)  # refuse before Celery starts; its tasks resolve the URL
    pool = "solo" if concurrency == 1 else "prefork"
    if pool == "prefork" and settings.metrics_port:
        # the children count: prometheus_client's multiprocess mode, which it picks when first imported
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="enrich-prometheus-")
    # lazy: prometheus_client only now (see above), and celery
    from core import metrics
    from core.celery_app import app, beat_schedule_file, configure
    from worker import runtime

    _json_logs(json_logs)
    configure(settings)
    queue_list = queues or settings.gpu_queue
    # the model and the registry timer start in each process that runs tasks (worker.tasks, worker_process_init)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, _health_checks(settings, resolve(settings), broker=True,
                                                            model=runtime.serves_model(settings, queue_list.split(",")),
                                                            beat=beat))
    hostname = hostname or f"{queue_list.replace(',', '+')}-{os.getpid()}@%h"
    # the solo pool runs a task inside Celery's event loop: with nothing prefetched, the message the broker
    # sends after the ack is read only when the loop's 2 s timer fires, so a backlog drains one task per 2 s
    prefetch = SOLO_PREFETCH if pool == "solo" else 1
    args = ["worker", f"--queues={queue_list}", f"--concurrency={concurrency}", f"--pool={pool}",
            f"--hostname={hostname}", f"--loglevel={loglevel}", f"--prefetch-multiplier={prefetch}",
            "--without-gossip", "--without-mingle"]
    if beat:
        schedule = beat_schedule_file(settings)
        schedule.parent.mkdir(parents=True, exist_ok=True)
        args += ["--beat", f"--schedule={schedule}"]
    app.worker_main(args)


def _health_checks(settings: Settings, url: str, broker: bool, model: bool, beat: bool = False
                   ) -> dict[str, Callable[[], None]]:
    def database() -> None:
        connect(url).close()

    def celery_broker() -> None:
        from core.celery_app import app  # lazy: celery

        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

    def model_served() -> None:
        from core.metrics import served_versions  # lazy: prometheus_client (see the module docstring)

        if not served_versions():  # prefork: the children's, from their metrics files
            raise RuntimeError("no model served yet (loading, or none active)")

    def beat_ticked() -> None:
        from worker.tasks import beat_age_s  # lazy: celery

        with connect(url) as conn:
            age = beat_age_s(conn)
        why = "beat down, or no worker serves the cpu queue"
        if age is None:
            raise RuntimeError(f"beat never seen: {why}")
        if age > 3 * settings.beat_tick_s:
            raise RuntimeError(f"beat not seen for {age:.0f} s: {why}")

    checks: dict[str, Callable[[], None]] = {"database": database}
    if broker:
        checks["broker"] = celery_broker
    if model:
        checks["model"] = model_served
    if beat:
        checks["beat"] = beat_ticked
    return checks


def sweep(
    older_than: float | None = typer.Option(None, help="seconds a listing must have been pending since its last change "
                                            "(default: ENRICH_PENDING_SWEEP_AFTER_S, 1800)."),
    database_url: DatabaseUrl = None,
) -> None:
    """Enqueue again the listings left pending (a lost task, retries spent); beat runs this every 10 min."""
    from core.celery_app import configure  # lazy: celery
    from worker.tasks import sweep_pending

    settings = get_settings()
    configure(settings)
    with connect(database_url or resolve(settings), autocommit=True) as conn:
        n = sweep_pending(conn, settings, older_than)
    typer.echo(f"{n} pending listing(s) enqueued again on queue {settings.gpu_queue!r}")


def review_order(database_url: DatabaseUrl = None) -> None:
    """Rank the open review items by expected gain for the console's `gain` order; beat runs this every
    ENRICH_REVIEW_REPRIORITISE_S (default 10 min)."""
    settings = get_settings()
    with connect(database_url or resolve(settings), autocommit=True) as conn:
        n = reprioritise(conn, settings)
    typer.echo(f"{n} open review item(s) got a priority (console order: {settings.review_order})")


_STALE_S = 15 * 60  # a running backfill whose row has not moved this long lost its chain (chunks ≤ 10 min)


def backfill(
    version: str | None = typer.Argument(None, help="Model version to re-embed the catalogue under (default: the "
                                         "active model; only the active model is backfilled)."),
    wait: bool = typer.Option(False, "--wait", help="Show a progress bar until the backfill is done (exit 0) or "
                                                    "cancelled (exit 1)."),
    status_only: bool = typer.Option(False, "--status", help="Only show the backfills, enqueue nothing."),
    force: bool = typer.Option(False, "--force", help="Enqueue even while a backfill of the version is running "
                                                      "(default: only when none is, or it stopped moving)."),
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="Seconds between progress reads (default: 1)."),
    timeout: float = typer.Option(0.0, "--timeout", min=0.0, help="With --wait: give up after this many "
                                                                  "seconds, exit 1 (default: 0 = never)."),
    database_url: DatabaseUrl = None,
) -> None:
    """Re-embed and re-tag the catalogue under the active model (promote and rollback start it); show progress."""
    from core.celery_app import configure, send_backfill  # lazy: celery (and model.registry imports it)
    from model.registry import active_version
    from worker.backfill import all_progress, progress

    console = Console()
    settings = get_settings()
    conn = connect(database_url or resolve(settings), autocommit=True)
    try:
        active = active_version(conn)
        version = version or active
        if status_only and not wait:
            table = Table(title="backfills")
            for col in ("version", "status", "done", "total", "started", "updated", "finished"):
                table.add_column(col, justify="right" if col in ("done", "total") else "left")
            for row in all_progress(conn):
                table.add_row(row.model_version + (" (active)" if row.model_version == active else ""), row.status,
                              str(row.done), str(row.total), f"{row.started_at:%Y-%m-%d %H:%M:%S}",
                              f"{row.updated_at:%Y-%m-%d %H:%M:%S}",
                              f"{row.finished_at:%Y-%m-%d %H:%M:%S}" if row.finished_at else "")
            console.print(table)
            return
        if version is None:
            console.print("[red]error:[/red] no active model: promote one first (`enrich promote`)")
            raise typer.Exit(2)
        if version != active and not status_only:
            console.print(f"[red]error:[/red] {version} is not the active model ({active or 'none'}): only the "
                          "active model is backfilled (`enrich rollback` makes an earlier one active again)")
            raise typer.Exit(2)
        if not status_only:
            p = progress(conn, version)
            running = p if p is not None and p.status == "running" else None
            age = None if running is None else time.time() - running.updated_at.timestamp()
            if running is not None and age is not None and age < _STALE_S and not force:
                console.print(f"backfill of {version} is running ({running.done}/{running.total}, updated "
                              f"{age:.0f}s ago); --force enqueues it again")
            else:
                configure(settings)
                send_backfill(version)
                console.print(f"backfill of {version} enqueued on queue {settings.backfill_queue!r}"
                              + (" (it had stopped moving)" if running is not None else ""))
        if wait:
            raise typer.Exit(_wait_for_backfill(conn, version, console, interval, timeout))
        p = progress(conn, version)
        if p is not None:
            console.print(f"{version}: {p.status}, {p.done}/{p.total} listings")
    finally:
        conn.close()


def _wait_for_backfill(conn: psycopg.Connection, version: str, console: Console, interval: float,
                       timeout: float) -> int:
    """A progress bar over the backfills row until it is done (0) or cancelled / timed out (1)."""
    from worker.backfill import progress  # lazy: celery

    deadline = time.monotonic() + timeout if timeout else None
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("listings"),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"backfill {version}", total=None, status="waiting for a worker on the backfill queue")
        while True:
            p = progress(conn, version)
            if p is not None:
                bar.update(task, total=max(p.total, 1), completed=min(p.done, p.total) if p.total else 1,
                           status=p.status)
                if p.status != "running":
                    break
            if deadline is not None and time.monotonic() > deadline:
                bar.update(task, status="timed out")
                return 1
            time.sleep(interval)
    console.print(f"backfill of {version} {p.status}: {p.done}/{p.total} listings")
    return 0 if p.status == "done" else 1


def health(
    database_url: DatabaseUrl = None,
    broker: bool = typer.Option(True, "--broker/--no-broker", help="Also check the Celery broker (default: on)."),
    beat: bool = typer.Option(False, "--beat", help="Also check that beat's tick ran within 3 × "
                              "ENRICH_BEAT_TICK_S (the process started with --beat; default: off)."),
) -> None:
    """Check that Postgres (and the Celery broker, and beat) answer; exit 0 when healthy, 1 otherwise."""
    from core.celery_app import configure  # lazy: celery
    from core.metrics import run_checks  # lazy: prometheus_client (see the module docstring)

    settings = get_settings()
    configure(settings)
    ok, results = run_checks(_health_checks(settings, database_url or resolve(settings), broker=broker, model=False,
                                            beat=beat))
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
    app.command("review-order")(review_order)
    app.command("backfill")(backfill)
    app.command("health")(health)
