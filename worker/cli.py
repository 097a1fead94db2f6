"""Worker subcommands (quickstart, batch, consume, worker, reindex, similar)."""
import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root `enrich` app."""
