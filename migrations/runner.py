"""Apply numbered SQL files once each, in order, under an advisory lock.

Forward-only: a file that was applied is never edited; a change is a new, higher-numbered file.
The lock makes two processes starting at once (two workers, a worker and `enrich migrate`)
serialise instead of racing on CREATE TABLE.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).parent
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_KEY = 0x656E72696368  # "enrich": an arbitrary, fixed advisory-lock key


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise ValueError(f"migration file {path.name!r} must be named NNNN_snake_case.sql")
        found.append(Migration(int(m.group(1)), path.stem, path.read_text()))
    numbers = [m.number for m in found]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"duplicate migration numbers in {directory}")
    return found


def _ensure_table(conn: psycopg.Connection) -> None:
    conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               number integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )


def applied(conn: psycopg.Connection) -> dict[int, str]:
    """Applied migration numbers → checksum."""
    _ensure_table(conn)
    return dict(conn.execute("SELECT number, checksum FROM schema_migrations").fetchall())


def pending(conn: psycopg.Connection, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    done = applied(conn)
    return [m for m in discover(directory) if m.number not in done]


def apply_all(conn: psycopg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every pending migration, each in its own transaction. Returns the names applied."""
    conn.autocommit = True
    conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        done = applied(conn)
        names = []
        for m in discover(directory):
            if m.number in done:
                if done[m.number] != m.checksum:
                    raise RuntimeError(f"migration {m.name} was edited after it was applied; add a new file instead")
                continue
            with conn.transaction():
                conn.execute(m.sql)  # a trusted file of the package, with no parameters
                conn.execute(
                    "INSERT INTO schema_migrations (number, name, checksum) VALUES (%s, %s, %s)",
                    (m.number, m.name, m.checksum),
                )
            log.info("applied migration %s", m.name)
            names.append(m.name)
        return names
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
