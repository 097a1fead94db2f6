"""Similar-items subcommands (reindex, similar)."""
import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root `enrich` app."""
