"""Numbered SQL migrations and the small runner that applies them (`enrich migrate`)."""
from migrations.runner import MIGRATIONS_DIR, applied, apply_all, pending

__all__ = ["MIGRATIONS_DIR", "applied", "apply_all", "pending"]
