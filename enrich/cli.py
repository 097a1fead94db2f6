"""`enrich`: one command-line entry point. Subcommands are registered by the packages that own them;
the application's own (quickstart, migrate) live here.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from core.config import get_settings
from core.db import DatabaseUnavailable, connect
from core.db import database_url as resolve_url
from core.options import DatabaseUrl
from enrich import explain_cli, models_cli
from enrich.console import cli as console_cli
from migrations import apply_all
from similar import cli as similar_cli
from training import cli as training_cli
from worker import cli as worker_cli

_FMNIST_DEFAULT = Path(os.environ.get("ENRICH_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))

app = typer.Typer(
    name="enrich",
    help="Catalogue enrichment: fill missing fashion tags, keep similar items, retrain the model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging (default: info).")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # third-party chatter drowns what our own logs say
    for noisy in ("kafka", "botocore", "urllib3", "PIL", "matplotlib", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def quickstart(
    data_dir: Path = typer.Option(None, "--data-dir", help="Where catalogue, model, index and embedded Postgres go "
                                  "(default: ENRICH_DATA_DIR, .enrich)."),
    fmnist_dir: Path = typer.Option(_FMNIST_DEFAULT, "--fmnist-dir", envvar="ENRICH_FMNIST_DIR",
                                    help="Fashion-MNIST idx files (default: /usr/share/datasets/fashion-mnist)."),
    items: int = typer.Option(300, "--items", min=10, max=10000,
                              help="Listings in the demo catalogue (default: 300)."),
    retrain: bool = typer.Option(False, "--retrain",
                                 help="Train a new quick model even if one exists (default: reuse)."),
    time_budget: float = typer.Option(None, "--time-budget", min=10,
                                      help="Training seconds (default: the QUICK preset's)."),
    open_console: bool = typer.Option(False, "--console", help="Then serve the browser console on the demo: an admin "
                                      "`quickstart-admin` with a new password (printed once), until Ctrl-C."),
) -> None:
    """Build a demo catalogue, train the quick model, fill missing tags, show accuracy and similar items."""
    from enrich.quickstart import DEMO_ADMIN, demo_admin, run_quickstart  # lazy: it trains and runs the model (torch)

    settings = get_settings(data_dir=data_dir)
    if not any(Path(fmnist_dir).glob("*idx*")):
        typer.echo(f"Fashion-MNIST not found in {fmnist_dir}: `apt-get install dataset-fashion-mnist` "
                   f"or pass --fmnist-dir", err=True)
        raise typer.Exit(2)
    run_quickstart(settings, fmnist_dir, items=items, retrain=retrain, time_budget_s=time_budget)
    if open_console:
        password = demo_admin(settings)
        Console().print(f"[bold]console:[/bold] http://{settings.console_host}:{settings.console_port}/ — sign in as "
                        f"[bold]{DEMO_ADMIN}[/bold] with password [bold]{password}[/bold] (shown once; "
                        f"`enrich console-user set-password {DEMO_ADMIN}` changes it). Ctrl-C stops it.")
        console_cli.serve(settings)


@app.command()
def migrate(database_url: DatabaseUrl = None) -> None:
    """Apply pending database migrations (safe to run again; forward-only)."""
    conn = connect(database_url or resolve_url(get_settings()))
    try:
        names = apply_all(conn)
    finally:
        conn.close()
    console.print(f"applied {len(names)} migration(s)"
                  + (f": {', '.join(names)}" if names else "; schema is up to date"))


def _register_subcommands() -> None:
    # each package owns its commands; their modules keep torch out of start-up
    training_cli.register(app)
    worker_cli.register(app)
    similar_cli.register(app)
    models_cli.register(app)
    console_cli.register(app)
    explain_cli.register(app)


_register_subcommands()


def main() -> None:
    try:
        app()
    except DatabaseUnavailable as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
