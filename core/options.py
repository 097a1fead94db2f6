"""Command-line options shared by every package's commands (typer, annotated once)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

DatabaseUrl = Annotated[Optional[str], typer.Option(
    "--database-url", envvar="ENRICH_DATABASE_URL",
    help="Postgres URL (default: ENRICH_DATABASE_URL, else the embedded Postgres under ENRICH_DATA_DIR).")]
