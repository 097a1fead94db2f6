"""Write errors that go away on a replay, and those that never will: which is which, and how to find the events
behind the second kind without giving up the rest of their batch.

Transient: the connection, the broker or a concurrent transaction (replaying the batch heals it). Permanent: data
the database or the code cannot take (invalid characters, constraint violations, values out of range, encoding
errors); replaying it fails the same way for ever, so the events behind it are found one at a time, inside
savepoints, and sent to a dead-letter topic while the rest of the batch is written.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import psycopg

log = logging.getLogger(__name__)

TRANSIENT = "transient"
PERMANENT = "permanent"
UNKNOWN = "unknown"

T = TypeVar("T")


def classify(exc: BaseException) -> str:
    """TRANSIENT, PERMANENT or UNKNOWN (replayed a bounded number of times, then isolated as permanent)."""
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return TRANSIENT  # connection lost, server shutting down, serialization failure, deadlock, timeout
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        return PERMANENT  # SQLSTATE classes 22 (data exception) and 23 (integrity constraint violation)
    if isinstance(exc, psycopg.DatabaseError):
        return UNKNOWN
    if isinstance(exc, (UnicodeError, ValueError, TypeError, OverflowError)):
        return PERMANENT  # the driver could not encode a value
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return TRANSIENT
    module = type(exc).__module__.split(".")[0]
    if module in ("kombu", "amqp", "redis"):
        return TRANSIENT  # the Celery broker
    return UNKNOWN


@dataclass(frozen=True)
class Rejected:
    """Why an event goes to the dead-letter topic: a reason code (a label of enrich_dead_letters_total) and a
    message for the person who reads it there."""

    reason: str
    detail: str


def refusal(exc: BaseException) -> Rejected:
    """The dead-letter reason and message for an event the store could not take."""
    if isinstance(exc, psycopg.Error):
        diag = exc.diag
        detail = f"{diag.sqlstate or ''} {diag.message_primary or str(exc)}".strip()
        return Rejected("db_refused", detail[:1000])
    return Rejected("unwritable", f"{type(exc).__name__}: {exc}"[:1000])


def one_by_one(conn: psycopg.Connection, n: int, store: Callable[[int], T]) -> tuple[list[T], dict[int, Rejected]]:
    """Call ``store(i)`` for i in 0..n-1, each in its own savepoint of one transaction: the events whose write fails
    for a reason a replay would not heal are refused, the others written. A transient error aborts the whole
    transaction (the caller replays the batch)."""
    done: list[T] = []
    refused: dict[int, Rejected] = {}
    with conn.transaction():
        for i in range(n):
            try:
                with conn.transaction():
                    done.append(store(i))
            except Exception as exc:
                if classify(exc) == TRANSIENT:
                    raise
                refused[i] = refusal(exc)
                log.warning("event %d of %d refused by the store: %s", i + 1, n, refused[i].detail)
    return done, refused
