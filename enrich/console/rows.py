"""Typed reads for the console: a query's rows as small frozen dataclasses (psycopg's `class_row`, matched by
column name), or the first column alone."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.rows import class_row, scalar_row

T = TypeVar("T")
Params = Sequence[object] | Mapping[str, object]


def fetch_all(conn: psycopg.Connection[Any], cls: type[T], query: str, params: Params = ()) -> list[T]:
    """Every row, each as `cls` (its fields named like the query's columns)."""
    with conn.cursor(row_factory=class_row(cls)) as cur:
        return cur.execute(query, params).fetchall()


def fetch_one(conn: psycopg.Connection[Any], cls: type[T], query: str, params: Params = ()) -> T | None:
    """The first row as `cls`; None when there is none."""
    with conn.cursor(row_factory=class_row(cls)) as cur:
        return cur.execute(query, params).fetchone()


def fetch_aggregate(conn: psycopg.Connection[Any], cls: type[T], query: str, params: Params = ()) -> T:
    """The one row of a query that always returns one (counts without GROUP BY)."""
    row = fetch_one(conn, cls, query, params)
    if row is None:
        raise LookupError("an aggregate query returned no row")
    return row


def fetch_value(conn: psycopg.Connection[Any], query: str, params: Params = ()) -> Any:
    """The first column of the first row; None when there is no row."""
    with conn.cursor(row_factory=scalar_row) as cur:
        return cur.execute(query, params).fetchone()


def fetch_values(conn: psycopg.Connection[Any], query: str, params: Params = ()) -> list[Any]:
    """The first column of every row."""
    with conn.cursor(row_factory=scalar_row) as cur:
        return cur.execute(query, params).fetchall()
