"""Model lifecycle commands: `enrich models` (versions with the reasons of their last gate verdict, alias
moves, retraining jobs; `show` one version's lineage, metrics and verdicts; `unreject` and `reject`; shadow
runs and their figures), `enrich rollback`. They sit on the application layer because they show the
registry, the gate's verdicts (training.gate) and the training jobs together."""
from __future__ import annotations

import getpass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from core.config import Settings, get_settings
from core.db import connect
from core.db import database_url as resolve_url
from core.options import DatabaseUrl, Embedded
from model.shadow import shadow_report

if TYPE_CHECKING:  # model.registry loads torch; `enrich --help` starts without it
    from model.registry import ModelRow

models_app = typer.Typer(help="Registered model versions: status, metrics, training data, who and why.",
                         invoke_without_command=True, no_args_is_help=False)
_BY_HELP = "Who asks (recorded with the change; default: the login name)."


def _connect(url: str | None, settings: Settings, embedded_ok: bool = True) -> psycopg.Connection[Any]:
    return connect(url or resolve_url(settings, embedded_ok=embedded_ok), autocommit=True)


def _fmt(metrics: dict[str, float], keys: tuple[str, ...] = ("test/top1", "test/recall@1",
                                                             "test/attr/exact_match")) -> str:
    return "  ".join(f"{k.split('/', 1)[1]} {metrics[k]:.4f}" for k in keys if k in metrics)


@models_app.callback()
def models(ctx: typer.Context, database_url: DatabaseUrl = None,
           events: int = typer.Option(10, "--events", min=0, help="Latest alias moves to show (default: 10)."),
           jobs: int = typer.Option(5, "--jobs", min=0, help="Latest retraining jobs to show, besides any queued "
                                                              "or running (default: 5).")) -> None:
    """List model versions (newest first) with status and the reasons of their last gate verdict, gate
    metrics, data fingerprint, who and why; the latest alias moves; retraining jobs and the running one's
    progress."""
    if ctx.invoked_subcommand is not None:
        return
    from model.registry import history, list_models, verdicts  # lazy: model.registry loads celery
    from training.gate import summary  # lazy: training.gate loads torch
    from training.jobs import job_progress  # lazy: training.jobs loads torch (training.gate)

    settings = get_settings()
    conn = _connect(database_url, settings)
    try:
        rows, moves = list_models(conn), history(conn, events)
        running = job_progress(conn, jobs, stale_s=settings.job_stale_s)
        last = {v.model_version: v for v in verdicts(conn, last=True)}
    finally:
        conn.close()
    console = Console()
    table = Table(title="models")
    for col in ("version", "status", "last gate verdict", "metrics", "data", "registered by", "created"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.model_version, r.status + (" (was active)" if r.was_active and r.status != "active" else ""),
                      summary(last[r.model_version].gate) if r.model_version in last else "",
                      _fmt(r.metrics), (r.data_fingerprint or "")[:12],
                      f"{r.registered_by or ''} {r.reason or ''}".strip(),
                      f"{r.created_at:%Y-%m-%d %H:%M}")
    console.print(table)
    console.print(f"review order: {settings.review_order}")  # ENRICH_REVIEW_ORDER: what reviewers are served first
    if moves:
        hist = Table(title="alias moves")
        for col in ("at", "action", "version", "previous", "by", "why"):
            hist.add_column(col)
        for m in moves:
            hist.add_row(f"{m.at:%Y-%m-%d %H:%M:%S}", m.action, m.model_version, m.previous or "", m.actor,
                         m.reason)
        console.print(hist)
    if running:
        console.print("retraining jobs:")
        for job in running:
            console.print(f"  {job['summary']}", soft_wrap=True)


@models_app.command("shadow")
def shadow(
    version: str = typer.Argument(None, help="Candidate the workers also run on a share of live listings "
                                             "(ENRICH_SHADOW_SHARE); omit with --off."),
    off: bool = typer.Option(False, "--off", help="Stop the shadow run (its figures are kept)."),
    reason: str = typer.Option("", "--reason", help="Why (recorded)."),
    by: str = typer.Option(None, "--by", help=_BY_HELP),
    database_url: DatabaseUrl = None,
) -> None:
    """Run a candidate in shadow: workers store its predictions apart, never as tags."""
    from model.registry import set_shadow  # lazy: model.registry loads celery

    if (version is None) == (not off):
        typer.echo("error: give a VERSION, or --off", err=True)
        raise typer.Exit(2)
    conn = _connect(database_url, get_settings())
    try:
        set_shadow(conn, None if off else version, actor=by or getpass.getuser(), reason=reason)
    except (LookupError, PermissionError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    finally:
        conn.close()
    typer.echo("no shadow model" if off else f"{version} runs in shadow; workers pick it up within "
               f"ENRICH_MODEL_CHECK_S")


@models_app.command("compare")
def compare_cmd(candidate: str = typer.Argument(..., help="The shadow candidate."),
                database_url: DatabaseUrl = None) -> None:
    """Shadow figures: agreement with the active model per group, accuracy on corrections made since."""
    conn = _connect(database_url, get_settings())
    try:
        r = shadow_report(conn, candidate)
    finally:
        conn.close()
    console = Console()
    table = Table(title=f"{candidate} in shadow: {r.listings} listings")
    for col in ("group", "predictions", "agrees with the active model"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for group, (n, agree) in r.agreement.items():
        table.add_row(group, str(n), f"{agree:.1%}")
    console.print(table)
    if r.corrections:
        console.print(f"on {r.corrections} corrections made since: candidate right {r.candidate_accuracy:.1%}, "
                      f"active model right {r.active_accuracy:.1%}")
    else:
        console.print("no corrections since the shadow predictions yet")


@models_app.command("show")
def show(version: str = typer.Argument(..., help="The model version."), database_url: DatabaseUrl = None) -> None:
    """One version: status, lineage (job, start, corrections, data), every metric, and the gate's verdicts."""
    from model.registry import get_model, verdicts  # lazy: model.registry loads celery
    from training.gate import explain  # lazy: training.gate loads torch

    conn = _connect(database_url, get_settings())
    try:
        row = get_model(conn, version)
        found = verdicts(conn, version) if row else []
    finally:
        conn.close()
    if row is None:
        typer.echo(f"error: model {version!r} is not registered", err=True)
        raise typer.Exit(2)
    typer.echo(f"{row.model_version}  {row.status}" + (" (was active)" if row.was_active and row.status != "active"
                                                       else ""))
    typer.echo(f"registered {row.created_at:%Y-%m-%d %H:%M} by {row.registered_by or '?'}: {row.reason or ''}")
    for line in lineage_lines(row):
        typer.echo(line)
    typer.echo("metrics:")
    for key in sorted(row.metrics):
        typer.echo(f"  {key}  {row.metrics[key]:.4f}")
    typer.echo("gate verdicts:" if found else "gate verdicts: none yet")
    for v in found:
        typer.echo(f"  {v.at:%Y-%m-%d %H:%M:%S} {v.action} by {v.actor}" + (f" ({v.reason})" if v.reason else ""))
        for line in explain(v.gate):
            typer.echo(f"    {line}")


def lineage_lines(row: ModelRow) -> list[str]:
    """The manifest's lineage in words: the job, the model it started from, the corrections, the data."""
    lin = row.lineage or {}
    lines = ["lineage:", f"  job: #{lin['job']}" if lin.get("job") else "  job: none (trained by hand)",
             f"  started from: {lin.get('started_from') or 'fresh weights'}"]
    if lin.get("started_at"):
        lines.append(f"  training began: {lin['started_at']}")
    n = lin.get("corrections") or 0
    lines.append(f"  corrections: {n}" + (f" (through {lin.get('corrections_through')}, sha256 "
                                          f"{(lin.get('corrections_sha256') or '')[:16]})" if n else ""))
    lines.append(f"  data: fingerprint {(row.data_fingerprint or '?')[:16]}, evaluation set {row.eval_set or '?'}")
    return lines


def _hand_move(conn: psycopg.Connection[Any], move: Callable[..., object], version: str, by: str | None,
               reason: str, done: str) -> None:
    """Run a registry move an admin asked for (who and why recorded) and close the connection; exit 2 with the
    reason when refused."""
    try:
        move(conn, version, actor=by or getpass.getuser(), reason=reason)
    except (LookupError, PermissionError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    finally:
        conn.close()
    typer.echo(f"{version} {done}")


@models_app.command("unreject")
def unreject(version: str = typer.Argument(..., help="A rejected candidate."),
             reason: str = typer.Option(..., "--reason", help="Why the gate's rejection is set aside (recorded)."),
             by: str = typer.Option(None, "--by", help=_BY_HELP), database_url: DatabaseUrl = None) -> None:
    """Put a rejected candidate back to 'candidate' (it can then be promoted through the gate again)."""
    from model.registry import unreject as run_unreject  # lazy: model.registry loads celery

    _hand_move(_connect(database_url, get_settings()), run_unreject, version, by, reason, "is a candidate again")


@models_app.command("reject")
def reject(version: str = typer.Argument(..., help="A candidate (or shadow) nobody should promote."),
           reason: str = typer.Option(..., "--reason", help="Why (recorded)."),
           by: str = typer.Option(None, "--by", help=_BY_HELP), database_url: DatabaseUrl = None) -> None:
    """Reject a candidate by hand (no gate involved); `unreject` puts it back."""
    from model.registry import reject_by_hand  # lazy: model.registry loads celery

    _hand_move(_connect(database_url, get_settings()), reject_by_hand, version, by, reason, "is rejected")


def rollback(
    version: str = typer.Argument(None, help="Version to make active again (default: the one the active model "
                                             "replaced). It must have been active before."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded)."),
    by: str = typer.Option(None, "--by", help=_BY_HELP),
    backfill: bool = typer.Option(True, "--backfill/--no-backfill",
                                  help="Enqueue the catalogue backfill for the version (default: on; it rewrites "
                                       "every listing the rolled-back version wrote)."),
    database_url: DatabaseUrl = None,
    embedded: Embedded = False,
) -> None:
    """Make an earlier model version active again, without a new gate; workers follow within seconds."""
    from model.registry import BackfillNotSent, backfill_after  # lazy: model.registry loads celery
    from model.registry import rollback as run_rollback

    settings = get_settings()
    conn = _connect(database_url, settings, embedded_ok=embedded)
    try:
        decision = run_rollback(conn, version, actor=by or getpass.getuser(), reason=reason)
    except (LookupError, PermissionError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    finally:
        conn.close()
    typer.echo(f"{decision.candidate} is active again (was {decision.previous})")
    if backfill:
        try:
            sent = backfill_after(decision, settings)  # the same step as the console's rollback button
        except BackfillNotSent as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        if sent:
            typer.echo(f"backfill of {decision.candidate} enqueued")


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root `enrich` app."""
    app.add_typer(models_app, name="models")
    app.command("rollback")(rollback)
