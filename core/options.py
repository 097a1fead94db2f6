"""Command-line options shared by every package's commands (typer, annotated once)."""
from __future__ import annotations

from typing import Annotated

import typer

DatabaseUrl = Annotated[str | None, typer.Option(
    "--database-url", envvar="ENRICH_DATABASE_URL",
    help="Postgres URL (default: ENRICH_DATABASE_URL, else the embedded Postgres under ENRICH_DATA_DIR, "
         "which some commands use only with --embedded).")]

Embedded = Annotated[bool, typer.Option(
    "--embedded",
    help="Run on the embedded Postgres under ENRICH_DATA_DIR when no database URL is given (default: refuse, so "
         "a host without ENRICH_DATABASE_URL never runs against an empty local database by mistake).")]
