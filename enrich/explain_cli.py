"""`enrich explain LISTING_ID`: why the model gave a listing its tags, as one heat-map PNG per predicted tag
(enrich/explain.py does the work)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from core.config import get_settings
from core.db import connect
from core.db import database_url as resolve_url
from core.options import DatabaseUrl


def explain_cmd(
    listing_id: str = typer.Argument(..., help="Listing whose predicted tags to explain."),
    out: Path = typer.Option(Path("."), "--out", help="Directory for the PNG overlays (default: the current one)."),
    model_dir: Path = typer.Option(None, "--model-dir", help="Model directory (default: ENRICH_MODEL_DIR, else the "
                                                              "registry's active model)."),
    local_paths: bool = typer.Option(None, "--local-paths/--no-local-paths",
                                     help="Allow image URIs that are local file paths (default: "
                                          "ENRICH_ALLOW_LOCAL_PATHS, off)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda[:n] (default: ENRICH_DEVICE, auto)."),
    database_url: DatabaseUrl = None,
) -> None:
    """Write one Grad-CAM heat map per predicted tag of a listing (PNG overlays on its first photo) and list
    them."""
    from enrich.explain import ExplainError, explain_listing, listing_photo_and_tags  # lazy: these load torch
    from model.artifacts import store_from_settings
    from model.inference import load_predictor
    from model.registry import model_dir_for

    err = Console(stderr=True)
    settings = get_settings(allow_local_paths=local_paths, device=device)
    conn = connect(database_url or resolve_url(settings), autocommit=True)
    try:
        listing_photo_and_tags(conn, listing_id)  # an unknown listing fails before the model loads
        mdir = model_dir or model_dir_for(conn, settings.model_dir, store=store_from_settings(settings))
        predictor = load_predictor(mdir, device=settings.device, mixed_precision=False)
        explained = explain_listing(conn, listing_id, predictor, out, settings)
    except (ExplainError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc
    finally:
        conn.close()
    for t in explained:
        note = "" if t.tagged_by in (None, predictor.version) else f" (tagged by {t.tagged_by})"
        if t.path is None:
            err.print(f"{t.group}={t.value}: no heat map, the model has no such output{note}", soft_wrap=True)
        else:
            typer.echo(f"{t.path}\t{t.group}={t.value}{note}")
    err.print(f"model {predictor.version}: {sum(t.path is not None for t in explained)} heat map(s) in {out}")


def register(app: typer.Typer) -> None:
    """Add this module's command to the root `enrich` app."""
    app.command("explain")(explain_cmd)
