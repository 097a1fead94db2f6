"""Similar-items subcommands: `enrich reindex` and `enrich similar`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import typer
from rich.console import Console
from rich.table import Table

from core.config import Settings, get_settings
from core.db import connect
from core.db import database_url as resolve_database_url
from core.images import ImageLimits
from core.options import DatabaseUrl
from schemas.taxonomy import CATEGORY_GROUP, COLOUR_GROUP
from similar.common import Neighbour, resolve_model_version
from similar.nightly import ReindexBusy, recompute
from similar.query import listing_tag, read_neighbours, similar_to
from similar.sheet import contact_sheet
from similar.snapshots import PublishError
from similar.store import version_info


def _connect(database_url: str | None, settings: Settings) -> psycopg.Connection:
    return connect(database_url or resolve_database_url(settings), autocommit=True)


def reindex(
    model_version: str = typer.Option(None, "--model-version", "-m",
                                      help="Model version to index (default: the active model once its "
                                           "backfill is done, else the model whose shelves serve)."),
    k: int = typer.Option(None, "--k", min=1, max=1000, help="Neighbours per listing (default: ENRICH_SIMILAR_K, 20)."),
    factory: str = typer.Option(None, "--factory",
                                help="faiss index-factory string, e.g. 'IVF4096,Flat' or 'HNSW32,Flat' "
                                     "(default: Flat up to 50,000 listings, else IVF with nlist ≈ 4·√n)."),
    nprobe: int = typer.Option(None, "--nprobe", min=1, help="IVF lists searched per query (default: 4)."),
    index_dir: Path = typer.Option(None, "--index-dir", help="Snapshot directory of a one-process run "
                                                             "(default: ENRICH_INDEX_DIR or <data dir>/index)."),
    keep: int = typer.Option(1, "--keep", min=0, help="Retired versions kept for rollback (default: 1)."),
    shards: int = typer.Option(None, "--shards", min=1, max=1024,
                               help="1: recompute here, in this process. N > 1: enqueue the job on the cpu queue; "
                                    "a cpu worker reads, builds and snapshots, then N shard tasks search on any "
                                    "cpu workers and the last switches. Needs a Celery result backend "
                                    "(ENRICH_CELERY_RESULT_BACKEND, Redis) here and on the workers, and a "
                                    "snapshot every worker sees (ENRICH_INDEX_URI or a shared ENRICH_INDEX_DIR) "
                                    "(default: ENRICH_REINDEX_SHARDS, 1)."),
    wait: bool = typer.Option(False, "--wait", help="With N > 1 shards: follow the job until its version switches "
                                                    "(exit 0) or fails (exit 1) (default: return once enqueued)."),
    timeout: float = typer.Option(0.0, "--timeout", min=0.0, help="With --wait: give up waiting after this many "
                                                                  "seconds, exit 1; the job goes on (default: 0 = "
                                                                  "never)."),
    database_url: DatabaseUrl = None,
) -> None:
    """Recompute top-K similar items for the whole catalogue and switch to them atomically."""
    console = Console(stderr=True)
    settings = get_settings()
    shards = settings.reindex_shards if shards is None else shards
    if shards > 1:
        if index_dir is not None:
            raise typer.BadParameter("the workers' ENRICH_INDEX_DIR holds a sharded run's snapshot",
                                     param_hint="--index-dir")
        raise typer.Exit(_enqueue_sharded(console, settings, model_version, k, factory, nprobe, keep, shards,
                                          wait, timeout, database_url))
    conn = _connect(database_url, settings)
    try:
        result = recompute(conn, model_version, settings=settings, k=k, factory=factory, nprobe=nprobe,
                           root=index_dir, keep_versions=keep, progress=True)
    except ReindexBusy as exc:
        console.print(f"[yellow]{exc}[/yellow]")
        raise typer.Exit(1) from exc
    except PublishError as exc:
        console.print(f"[red]error:[/red] {exc}; the active similar items are unchanged")
        raise typer.Exit(1) from exc
    except LookupError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    finally:
        conn.close()
    console.print(result.summary())


def _enqueue_sharded(console: Console, settings: Settings, model_version: str | None, k: int | None,
                     factory: str | None, nprobe: int | None, keep: int, shards: int, wait: bool, timeout: float,
                     database_url: str | None) -> int:
    """Send "enrich.reindex" with `shards` to the cpu queue; with `wait`, follow it. Returns the exit code."""
    # lazy: these import celery, which the other commands do without
    from core.celery_app import REINDEX_TASK, app, configure
    from similar.tasks import chords_unavailable

    configure(settings)
    why = chords_unavailable()
    if why:  # checked here: without a backend the chord could never join, and --wait would wait forever
        console.print(f"[red]error:[/red] {why}")
        return 2
    result = app.send_task(REINDEX_TASK, queue=settings.cpu_queue,
                           kwargs={"model_version": model_version, "k": k, "shards": shards, "factory": factory,
                                   "nprobe": nprobe, "keep": keep})
    console.print(f"similar-items reindex in {shards} shards enqueued on queue {settings.cpu_queue!r} (task "
                  f"{result.id}); `enrich worker -Q {settings.cpu_queue}` workers run it"
                  + ("" if wait else "; --wait follows it to the switch"))
    if not wait:
        return 0
    return _follow_sharded(console, settings, result, timeout, database_url)


def _follow_sharded(console: Console, settings: Settings, result: Any, timeout: float,
                    database_url: str | None) -> int:
    """Wait for the preparing task (`result`, a Celery AsyncResult), then print the version's shard count
    until it switches or fails."""
    deadline = time.monotonic() + timeout if timeout else None

    def waited_out() -> bool:
        if deadline is not None and time.monotonic() > deadline:
            console.print(f"[yellow]gave up waiting after {timeout:.0f}s; the job goes on[/yellow]")
            return True
        time.sleep(0.5)
        return False

    console.print("waiting for a cpu worker to read, build and snapshot the index…")
    while not result.ready():
        if waited_out():
            return 1
    if result.failed():
        console.print(f"[red]error:[/red] the reindex failed before its shards started: {result.result!r}")
        return 1
    started = result.result
    if started is None:
        console.print("[yellow]another recompute of this model is running; this one was skipped[/yellow]")
        return 1
    version = started["version"]
    shown = None
    conn = _connect(database_url, settings)
    try:
        while True:
            info = version_info(conn, version)
            if info is None:
                console.print(f"[red]error:[/red] version {version} is gone")
                return 1
            status, params = info.status, info.params
            written = params.get("written", {})
            line = (f"version {version}: {status}, {len(written)} of {started['shards']} shards written "
                    f"({sum(written.values()):,} listings)")
            if line != shown:
                console.print(line)
                shown = line
            if status == "failed":
                console.print(f"[red]error:[/red] version {version} failed: {params.get('error')}; the active "
                              "similar items are unchanged")
                return 1
            if status != "building":
                console.print(f"version {version} switched: its similar items serve now")
                return 0
            if waited_out():
                return 1
    finally:
        conn.close()


def _condition_mask(conn: psycopg.Connection, model_version: str, group: str, model_dir: Path | None,
                    settings: Settings) -> np.ndarray:
    """The model's mask of the attribute group `group` (loads the model once; CPU is enough)."""
    # lazy: these load torch, which the other commands do without
    from model.inference import load_predictor
    from model.registry import model_dir_for

    if model_dir is None:  # --model-dir wins; else the registry's directory of this version
        try:
            model_dir = model_dir_for(conn, settings.model_dir, version=model_version)
        except FileNotFoundError as exc:
            raise LookupError(str(exc)) from exc
    masks = load_predictor(model_dir, device="cpu").condition_masks()
    if group not in masks:
        raise LookupError(f"model has no attribute group {group!r}; groups: {', '.join(sorted(masks))}")
    return masks[group]


def similar_cmd(
    listing_id: str = typer.Argument(..., help="Listing to find neighbours of."),
    model_version: str = typer.Option(None, "--model-version", "-m",
                                      help="Model version (default: the model whose shelves serve)."),
    k: int = typer.Option(10, "--k", min=1, max=1000, help="Neighbours to show (default: 10)."),
    by: str = typer.Option(None, "--by", help="Similar by one attribute group (the model's mask of that group), "
                                               "e.g. 'colour'."),
    same_category: bool = typer.Option(False, "--same-category", help="Only listings with the same category tag."),
    same_type: bool = typer.Option(False, "--same-type", help="Only listings with the same type tag."),
    other_colours: bool = typer.Option(False, "--other-colours", help="This one in another colour: ranked with the "
                                       "colour dimensions masked out, only listings whose colour tag differs."),
    live: bool = typer.Option(False, "--live",
                              help="Compute now by exact search instead of reading the stored shelf."),
    model_dir: Path = typer.Option(None, "--model-dir",
                                   help="Model directory for --by (default: from the models registry)."),
    png: Path = typer.Option(None, "--png", help="Also write a contact sheet (query + neighbours) to this PNG."),
    database_url: DatabaseUrl = None,
) -> None:
    """Print a listing's neighbours with scores (stored shelf by default; live with
    --by/--same-*/--other-colours/--live)."""
    console = Console()
    settings = get_settings()
    conn = _connect(database_url, settings)
    try:
        mv = resolve_model_version(conn, model_version)
        neighbours: list[Neighbour]
        source: str | None
        if by or same_category or same_type or other_colours or live:
            if by and other_colours:
                raise LookupError("--by and --other-colours do not go together")
            group = COLOUR_GROUP if other_colours else by
            mask = _condition_mask(conn, mv, group, model_dir, settings) if group else None
            neighbours = similar_to(conn, listing_id, mv, k, mask=mask, same_category=same_category,
                                    same_type=same_type, other_colours=other_colours)
            source = "live" + (f", by {by}" if by else "") + (", other colours" if other_colours else "")
        else:
            neighbours, source = read_neighbours(conn, listing_id, mv, k)
            if not neighbours:
                neighbours, source = similar_to(conn, listing_id, mv, k), "live (nothing stored yet)"
        table = Table(title=f"similar to {listing_id} — model {mv} ({source})")
        table.add_column("#", justify="right")
        table.add_column("listing")
        table.add_column("score", justify="right")
        table.add_column("category")
        table.add_column("colour")
        for i, n in enumerate(neighbours, 1):
            table.add_row(str(i), n.listing_id, f"{n.score:.4f}", listing_tag(conn, n.listing_id, CATEGORY_GROUP) or "",
                          listing_tag(conn, n.listing_id, COLOUR_GROUP) or "")
        console.print(table)
        if png is not None:
            shown = contact_sheet(conn, listing_id, neighbours, png, limits=ImageLimits.from_settings(settings))
            console.print(f"contact sheet: {png} ({shown} of {len(neighbours) + 1} images found)")
    except LookupError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    finally:
        conn.close()


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root `enrich` app."""
    app.command("reindex")(reindex)
    app.command("similar")(similar_cmd)
