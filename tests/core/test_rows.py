"""Typed reads on the real Postgres: rows become dataclasses by column name; a query that must return a row
and returns none says so instead of handing back None."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from core.rows import fetch_all, fetch_one, fetch_required, fetch_required_value, fetch_row, fetch_value, fetch_values


@dataclass(frozen=True)
class Pair:
    name: str
    n: int


def test_rows_map_to_dataclasses_by_column_name_not_position(db):
    rows = fetch_all(db, Pair, "SELECT n, name FROM (VALUES (1, 'a'), (2, 'b')) AS t(n, name) ORDER BY n")
    assert rows == [Pair("a", 1), Pair("b", 2)]
    assert fetch_one(db, Pair, "SELECT 'c' AS name, 3 AS n") == Pair("c", 3)
    with pytest.raises(TypeError):  # a column the dataclass does not have is an error, not silently dropped
        fetch_one(db, Pair, "SELECT 'c' AS name, 3 AS n, 4 AS extra")


def test_a_required_row_or_value_raises_when_the_query_returns_none(db):
    empty = "SELECT 'x' AS name, 1 AS n WHERE false"
    assert fetch_one(db, Pair, empty) is None and fetch_value(db, "SELECT 1 WHERE false") is None
    with pytest.raises(LookupError):
        fetch_required(db, Pair, empty)
    with pytest.raises(LookupError):
        fetch_required_value(db, "SELECT 1 WHERE false")
    with pytest.raises(LookupError):
        fetch_row(db, "SELECT 1 WHERE false")
    assert fetch_row(db, "SELECT %s::int, %s::text", (7, "y")) == (7, "y")
    assert fetch_required_value(db, "SELECT count(*) FROM (VALUES (1), (2)) AS t(v)") == 2
    assert fetch_values(db, "SELECT v FROM (VALUES (2), (1)) AS t(v) ORDER BY v") == [1, 2]
