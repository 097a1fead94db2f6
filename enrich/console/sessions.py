"""Console sessions the server can end (table console_sessions).

The signed cookie keeps a random session id beside the page state (CSRF token, review position); the table
keeps the id's sha256. A request is signed in only while its row is open, seen within the idle timeout and
younger than the absolute lifetime, and the account is enabled: a cookie copied before logout, a password
change or a disable is worth nothing afterwards, however often it was re-signed.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import psycopg

from core.rows import fetch_one, fetch_value


def _hash(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def start(conn: psycopg.Connection, user: str, address: str | None) -> str:
    """A new session for `user`; returns the id the cookie carries."""
    sid = secrets.token_urlsafe(32)
    conn.execute("INSERT INTO console_sessions (id_hash, user_name, address) VALUES (%s, %s, %s)",
                 (_hash(sid), user, address))
    return sid


@dataclass(frozen=True)
class User:
    """Who a live session belongs to."""
    name: str
    role: str  # reviewer or admin

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def check(conn: psycopg.Connection, sid: str, idle_s: float, max_s: float) -> User | None:
    """The account of a live session, its last use set to now; None when it ended, idled out or is too old,
    or the account is disabled."""
    return fetch_one(
        conn, User,
        "UPDATE console_sessions s SET seen_at = now() FROM console_users u"
        " WHERE s.id_hash = %s AND s.ended_at IS NULL AND u.name = s.user_name AND NOT u.disabled"
        " AND s.seen_at > now() - make_interval(secs => %s) AND s.created_at > now() - make_interval(secs => %s)"
        " RETURNING u.name, u.role", (_hash(sid), idle_s, max_s))


def end(conn: psycopg.Connection, sid: str, reason: str) -> None:
    conn.execute("UPDATE console_sessions SET ended_at = now(), end_reason = %s"
                 " WHERE id_hash = %s AND ended_at IS NULL", (reason, _hash(sid)))


def end_all(conn: psycopg.Connection, user: str, reason: str) -> int:
    """End every open session of `user`; returns how many."""
    return conn.execute("UPDATE console_sessions SET ended_at = now(), end_reason = %s"
                        " WHERE user_name = %s AND ended_at IS NULL", (reason, user)).rowcount


def known_address(conn: psycopg.Connection, user: str, address: str | None) -> bool:
    """Has `user` signed in from `address` before?"""
    return address is not None and bool(fetch_value(
        conn, "SELECT EXISTS (SELECT 1 FROM console_sessions WHERE user_name = %s AND address = %s)",
        (user, address)))


def forget_old(conn: psycopg.Connection, keep_days: int = 90) -> None:
    """Drop rows of sessions that ended or began long ago (sign-in addresses are remembered that long)."""
    conn.execute("DELETE FROM console_sessions WHERE created_at < now() - make_interval(days => %s)", (keep_days,))
