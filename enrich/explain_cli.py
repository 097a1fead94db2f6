"""`enrich explain LISTING_ID`: why the model gave a listing its tags, as one heat-map PNG per predicted tag.

The listing's first photo is fetched through the worker's guards (allow-listed sources, size and pixel
limits), the model explains each predicted tag by Grad-CAM (model/explain.py) and the overlays are written
as ``<listing>-<group>-<value>.png``. Seller and corrected tags are not the model's, so they get none.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psycopg
import typer

from core.config import Settings, get_settings
from core.options import DatabaseUrl


class ExplainError(LookupError):
    """The listing cannot be explained (unknown, no photo, no predicted tag, no model)."""


@dataclass(frozen=True)
class ExplainedTag:
    group: str
    value: str
    confidence: float | None
    tagged_by: str | None  # model version that predicted the tag
    path: Path | None  # None: the model has no output for this group (decided from the text alone)


def listing_photo_and_tags(conn: psycopg.Connection, listing_id: str) -> tuple[str, list[tuple]]:
    """The listing's first image URI and its predicted tags [(group, value, confidence, model_version)]."""
    row = conn.execute("SELECT event->'images'->>0 FROM listings WHERE listing_id = %s", (listing_id,)).fetchone()
    if row is None:
        raise ExplainError(f"no listing {listing_id!r}")
    tags = conn.execute("SELECT tag_group, value, confidence, model_version FROM listing_tags"
                        " WHERE listing_id = %s AND source = 'predicted' ORDER BY tag_group",
                        (listing_id,)).fetchall()
    if not tags:
        raise ExplainError(f"listing {listing_id!r} has no predicted tags (seller and corrected tags are not "
                           f"the model's; a pending listing has none yet)")
    if row[0] is None:
        raise ExplainError(f"listing {listing_id!r} has no image")
    return row[0], tags


def explain_listing(conn: psycopg.Connection, listing_id: str, predictor, out_dir: Path,
                    settings: Settings) -> list[ExplainedTag]:
    """Write one overlay per predicted tag of the listing into ``out_dir``; the library call behind the command."""
    from core.images import ImageError, load_image
    from model.explain import explain, explanation_filename, overlay_png, target_for

    uri, tags = listing_photo_and_tags(conn, listing_id)
    try:
        photo = load_image(uri, settings)
    except ImageError as exc:
        raise ExplainError(f"listing {listing_id!r}: its first image cannot be used: {exc}") from exc
    model = predictor.model
    targets = []
    for group, value, _, _ in tags:
        try:
            targets.append(target_for(model, group, value))
        except KeyError:  # decided from the listing's text alone, or a value this model does not have
            pass
    heat = explain(model, predictor.preprocess(photo), targets) if targets else {}  # keyed (group, value)
    done = []
    for group, value, confidence, version in tags:
        path = None
        if (group, value) in heat:
            path = overlay_png(photo, heat[(group, value)], Path(out_dir) / explanation_filename(listing_id, group,
                                                                                                   value))
        done.append(ExplainedTag(group, value, confidence, version, path))
    return done


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
    from rich.console import Console

    from core.db import connect
    from core.db import database_url as resolve
    from model.artifacts import store_from_settings
    from model.inference import load_predictor
    from model.registry import model_dir_for

    err = Console(stderr=True)
    settings = get_settings(allow_local_paths=local_paths, device=device)
    conn = connect(database_url or resolve(settings), autocommit=True)
    try:
        listing_photo_and_tags(conn, listing_id)  # an unknown listing fails before the model loads
        mdir = model_dir or model_dir_for(conn, settings.model_dir, store=store_from_settings(settings))
        predictor = load_predictor(mdir, device=settings.device, mixed_precision=False)
        explained = explain_listing(conn, listing_id, predictor, out, settings)
    except (ExplainError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2)
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
