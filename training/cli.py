"""Training subcommands (train, evaluate, promote)."""
import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root `enrich` app."""
