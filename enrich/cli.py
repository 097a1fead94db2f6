"""`enrich`: one command-line entry point. Subcommands are registered by the packages that own them."""
from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

from core.db import DatabaseUnavailable

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
def migrate(
    database_url: str = typer.Option(None, "--database-url", envvar="ENRICH_DATABASE_URL",
                                     help="Postgres URL (default: the embedded Postgres under ENRICH_DATA_DIR)."),
) -> None:
    """Apply pending database migrations (safe to run again; forward-only)."""
    from core.db import connect, database_url as resolve
    from migrations import apply_all

    conn = connect(database_url or resolve())
    try:
        names = apply_all(conn)
    finally:
        conn.close()
    console.print(f"applied {len(names)} migration(s)" + (f": {', '.join(names)}" if names else "; schema is up to date"))


def _register_subcommands() -> None:
    # Each package owns its commands; importing is cheap because heavy imports happen inside commands.
    from training import cli as training_cli
    from worker import cli as worker_cli
    from similar import cli as similar_cli

    training_cli.register(app)
    worker_cli.register(app)
    similar_cli.register(app)


_register_subcommands()


def main() -> None:
    try:
        app()
    except DatabaseUnavailable as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
