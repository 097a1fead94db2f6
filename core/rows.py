"""Typed reads of query results: rows as small frozen dataclasses (psycopg's `class_row`, matched by column
name), or a first column alone, so no caller indexes a tuple."""
from __future__ import annotations

from typing import Any, TypeVar

import psycopg
from psycopg.abc import Params, QueryNoTemplate
from psycopg.rows import class_row, scalar_row

T = TypeVar("T")


def fetch_all(conn: psycopg.Connection[Any], cls: type[T], query: QueryNoTemplate,
              params: Params | None = None) -> list[T]:
    """Every row, each as `cls` (its fields named like the query's columns)."""
    with conn.cursor(row_factory=class_row(cls)) as cur:
        return cur.execute(query, params).fetchall()


def fetch_one(conn: psycopg.Connection[Any], cls: type[T], query: QueryNoTemplate,
              params: Params | None = None) -> T | None:
    """The first row as `cls`; None when there is none."""
    with conn.cursor(row_factory=class_row(cls)) as cur:
        return cur.execute(query, params).fetchone()


def fetch_required(conn: psycopg.Connection[Any], cls: type[T], query: QueryNoTemplate,
                   params: Params | None = None) -> T:
    """The row of a query that always returns one (an aggregate, INSERT … RETURNING) as `cls`."""
    row = fetch_one(conn, cls, query, params)
    if row is None:
        raise LookupError(f"no row from {query!r}")
    return row


def fetch_row(conn: psycopg.Connection[Any], query: QueryNoTemplate, params: Params | None = None) -> tuple[Any, ...]:
    """The row of a query that always returns one, as a tuple to unpack by name (`n, newest = …`)."""
    row: tuple[Any, ...] | None = conn.execute(query, params).fetchone()
    if row is None:
        raise LookupError(f"no row from {query!r}")
    return row


def fetch_value(conn: psycopg.Connection[Any], query: QueryNoTemplate, params: Params | None = None) -> Any:
    """The first column of the first row; None when there is no row."""
    with conn.cursor(row_factory=scalar_row) as cur:
        return cur.execute(query, params).fetchone()


def fetch_required_value(conn: psycopg.Connection[Any], query: QueryNoTemplate, params: Params | None = None) -> Any:
    """The first column of the row of a query that always returns one (a count, a lock, an age)."""
    with conn.cursor(row_factory=scalar_row) as cur:
        row = cur.execute(query, params).fetchone()
    if row is None:
        raise LookupError(f"no row from {query!r}")
    return row


def fetch_values(conn: psycopg.Connection[Any], query: QueryNoTemplate, params: Params | None = None) -> list[Any]:
    """The first column of every row."""
    with conn.cursor(row_factory=scalar_row) as cur:
        return cur.execute(query, params).fetchall()
