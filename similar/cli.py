"""Similar-items subcommands: `enrich reindex` and `enrich similar`."""
from __future__ import annotations

from pathlib import Path

import typer

_DB_HELP = "Postgres URL (default: ENRICH_DATABASE_URL, else the embedded Postgres under ENRICH_DATA_DIR)."


def _connect(database_url: str | None):
    from core.db import connect, database_url as resolve

    return connect(database_url or resolve(), autocommit=True)


def reindex(
    model_version: str = typer.Option(None, "--model-version", "-m",
                                      help="Model version to index (default: the active model's)."),
    k: int = typer.Option(None, "--k", min=1, max=1000, help="Neighbours per listing (default: ENRICH_SIMILAR_K, 20)."),
    factory: str = typer.Option(None, "--factory",
                                help="faiss index-factory string, e.g. 'IVF4096,Flat' or 'HNSW32,Flat' "
                                     "(default: Flat up to 50,000 listings, else IVF with nlist ≈ 4·√n)."),
    nprobe: int = typer.Option(None, "--nprobe", min=1, help="IVF lists searched per query (default: 4)."),
    index_dir: Path = typer.Option(None, "--index-dir", help="Snapshot directory (default: ENRICH_INDEX_DIR or <data dir>/index)."),
    keep: int = typer.Option(1, "--keep", min=0, help="Retired versions kept for rollback (default: 1)."),
    database_url: str = typer.Option(None, "--database-url", envvar="ENRICH_DATABASE_URL", help=_DB_HELP),
) -> None:
    """Recompute top-K similar items for the whole catalogue and switch to them atomically."""
    from rich.console import Console

    from similar import shelves as similar
    from similar.snapshots import PublishError

    console = Console(stderr=True)
    conn = _connect(database_url)
    try:
        result = similar.recompute(conn, model_version, k=k, factory=factory, nprobe=nprobe, root=index_dir,
                                   keep_versions=keep, progress=True)
    except similar.ReindexBusy as exc:
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


def _condition_mask(conn, model_version: str, group: str, model_dir: Path | None):
    """The model's seed-001 mask for `group` (loads the model once; CPU is enough)."""
    from core.config import get_settings
    from model.inference import load_predictor
    from model.registry import get_model

    if model_dir is None:
        row = get_model(conn, model_version)
        model_dir = Path(row.path) if row else get_settings().model_dir
    if model_dir is None:
        raise LookupError(f"no model directory known for {model_version!r}; pass --model-dir")
    masks = load_predictor(model_dir, device="cpu").condition_masks()
    if group not in masks:
        raise LookupError(f"model has no attribute group {group!r}; groups: {', '.join(sorted(masks))}")
    return masks[group]


def similar_cmd(
    listing_id: str = typer.Argument(..., help="Listing to find neighbours of."),
    model_version: str = typer.Option(None, "--model-version", "-m", help="Model version (default: the active model's)."),
    k: int = typer.Option(10, "--k", min=1, max=1000, help="Neighbours to show (default: 10)."),
    by: str = typer.Option(None, "--by", help="Similar by one attribute group (seed 001 condition mask), e.g. 'colour'."),
    same_category: bool = typer.Option(False, "--same-category", help="Only listings with the same category tag."),
    same_type: bool = typer.Option(False, "--same-type", help="Only listings with the same type tag."),
    live: bool = typer.Option(False, "--live", help="Compute now by exact search instead of reading the stored shelf."),
    model_dir: Path = typer.Option(None, "--model-dir", help="Model directory for --by (default: from the models registry)."),
    png: Path = typer.Option(None, "--png", help="Also write a contact sheet (query + neighbours) to this PNG."),
    database_url: str = typer.Option(None, "--database-url", envvar="ENRICH_DATABASE_URL", help=_DB_HELP),
) -> None:
    """Print a listing's neighbours with scores (stored shelf by default; live with --by/--same-*/--live)."""
    from rich.console import Console
    from rich.table import Table

    from similar import shelves as similar

    console = Console()
    conn = _connect(database_url)
    try:
        mv = similar.resolve_model_version(conn, model_version)
        if by or same_category or same_type or live:
            mask = _condition_mask(conn, mv, by, model_dir) if by else None
            neighbours = similar.similar_to(conn, listing_id, mv, k, mask=mask,
                                            same_category=same_category, same_type=same_type)
            source = "live" + (f", by {by}" if by else "")
        else:
            neighbours, source = similar.read_neighbours(conn, listing_id, mv, k)
            if not neighbours:
                neighbours, source = similar.similar_to(conn, listing_id, mv, k), "live (nothing stored yet)"
        table = Table(title=f"similar to {listing_id} — model {mv} ({source})")
        table.add_column("#", justify="right")
        table.add_column("listing")
        table.add_column("score", justify="right")
        table.add_column("category")
        for i, n in enumerate(neighbours, 1):
            table.add_row(str(i), n.listing_id, f"{n.score:.4f}", similar.listing_tag(conn, n.listing_id, "category") or "")
        console.print(table)
        if png is not None:
            from similar.sheet import contact_sheet

            shown = contact_sheet(conn, listing_id, neighbours, png)
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
