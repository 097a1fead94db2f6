"""Similar-items subcommands: `enrich reindex` and `enrich similar`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from core.options import DatabaseUrl

if TYPE_CHECKING:
    from core.config import Settings


def _connect(database_url: str | None, settings: Settings):
    from core.db import connect, database_url as resolve

    return connect(database_url or resolve(settings), autocommit=True)


def reindex(
    model_version: str = typer.Option(None, "--model-version", "-m",
                                      help="Model version to index (default: the active model once its "
                                           "backfill is done, else the model whose shelves serve)."),
    k: int = typer.Option(None, "--k", min=1, max=1000, help="Neighbours per listing (default: ENRICH_SIMILAR_K, 20)."),
    factory: str = typer.Option(None, "--factory",
                                help="faiss index-factory string, e.g. 'IVF4096,Flat' or 'HNSW32,Flat' "
                                     "(default: Flat up to 50,000 listings, else IVF with nlist ≈ 4·√n)."),
    nprobe: int = typer.Option(None, "--nprobe", min=1, help="IVF lists searched per query (default: 4)."),
    index_dir: Path = typer.Option(None, "--index-dir", help="Snapshot directory (default: ENRICH_INDEX_DIR or <data dir>/index)."),
    keep: int = typer.Option(1, "--keep", min=0, help="Retired versions kept for rollback (default: 1)."),
    database_url: DatabaseUrl = None,
) -> None:
    """Recompute top-K similar items for the whole catalogue and switch to them atomically."""
    from rich.console import Console

    from core.config import get_settings
    from similar.nightly import ReindexBusy, recompute
    from similar.snapshots import PublishError

    console = Console(stderr=True)
    settings = get_settings()
    conn = _connect(database_url, settings)
    try:
        result = recompute(conn, model_version, settings=settings, k=k, factory=factory, nprobe=nprobe,
                           root=index_dir, keep_versions=keep, progress=True)
    except ReindexBusy as exc:
        console.print(f"[yellow]{exc}[/yellow]")
        raise typer.Exit(1)
    except PublishError as exc:
        console.print(f"[red]error:[/red] {exc}; the active similar items are unchanged")
        raise typer.Exit(1)
    except LookupError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    finally:
        conn.close()
    console.print(result.summary())


def _condition_mask(conn, model_version: str, group: str, model_dir: Path | None, settings: Settings):
    """The model's seed-001 mask for `group` (loads the model once; CPU is enough)."""
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
    model_version: str = typer.Option(None, "--model-version", "-m", help="Model version (default: the model whose shelves serve)."),
    k: int = typer.Option(10, "--k", min=1, max=1000, help="Neighbours to show (default: 10)."),
    by: str = typer.Option(None, "--by", help="Similar by one attribute group (seed 001 condition mask), e.g. 'colour'."),
    same_category: bool = typer.Option(False, "--same-category", help="Only listings with the same category tag."),
    same_type: bool = typer.Option(False, "--same-type", help="Only listings with the same type tag."),
    other_colours: bool = typer.Option(False, "--other-colours", help="This one in another colour: ranked with the "
                                       "colour dimensions masked out, only listings whose colour tag differs."),
    live: bool = typer.Option(False, "--live", help="Compute now by exact search instead of reading the stored shelf."),
    model_dir: Path = typer.Option(None, "--model-dir", help="Model directory for --by (default: from the models registry)."),
    png: Path = typer.Option(None, "--png", help="Also write a contact sheet (query + neighbours) to this PNG."),
    database_url: DatabaseUrl = None,
) -> None:
    """Print a listing's neighbours with scores (stored shelf by default; live with --by/--same-*/--other-colours/--live)."""
    from rich.console import Console
    from rich.table import Table

    from core.config import get_settings
    from similar.common import resolve_model_version
    from schemas.taxonomy import CATEGORY_GROUP, COLOUR_GROUP
    from similar.query import listing_tag, read_neighbours, similar_to

    console = Console()
    settings = get_settings()
    conn = _connect(database_url, settings)
    try:
        mv = resolve_model_version(conn, model_version)
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
            from core.images import ImageLimits
            from similar.sheet import contact_sheet

            shown = contact_sheet(conn, listing_id, neighbours, png, limits=ImageLimits.from_settings(settings))
            console.print(f"contact sheet: {png} ({shown} of {len(neighbours) + 1} images found)")
    except LookupError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    finally:
        conn.close()


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root `enrich` app."""
    app.command("reindex")(reindex)
    app.command("similar")(similar_cmd)
