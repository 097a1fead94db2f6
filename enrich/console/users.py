"""Console accounts in Postgres (argon2id hashes) and the audit trail of what each person did."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cache

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from core.rows import fetch_all, fetch_one, fetch_value
from enrich.console import sessions

ROLES = ("reviewer", "admin")
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")  # the table's CHECK
MIN_PASSWORD = 10
_hasher = PasswordHasher()


@dataclass(frozen=True)
class Login:
    """What signing in checks: an enabled account's hash and role."""
    password_hash: str
    role: str


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    disabled: bool
    created_at: datetime
    last_sign_in: datetime | None
    open_sessions: int


@cache
def dummy_hash() -> str:
    """Verifying against this keeps a login for an unknown name as slow as one for a known name. Made on first
    use (one argon2id hash), not on import: the CLI imports this module; the console app makes it at start."""
    return _hasher.hash("no such user")


def add_user(conn: psycopg.Connection, name: str, password: str, role: str) -> None:
    """Create an account, or reset its password and role."""
    if not NAME.match(name):
        raise ValueError(f"a name is 1–64 letters, digits or . _ @ - (got {name!r})")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    _check_password(password)
    with conn.transaction():
        conn.execute("INSERT INTO console_users (name, password_hash, role) VALUES (%s, %s, %s)"
                     " ON CONFLICT (name) DO UPDATE SET password_hash = EXCLUDED.password_hash,"
                     " role = EXCLUDED.role, disabled = false", (name, _hasher.hash(password), role))
        sessions.end_all(conn, name, "password changed")


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"a password needs at least {MIN_PASSWORD} characters")


def set_password(conn: psycopg.Connection, name: str, password: str) -> int:
    """Change a password and end the account's sessions; returns how many ended."""
    _check_password(password)
    with conn.transaction():
        if conn.execute("UPDATE console_users SET password_hash = %s WHERE name = %s",
                        (_hasher.hash(password), name)).rowcount == 0:
            raise LookupError(f"no account {name!r}")
        return sessions.end_all(conn, name, "password changed")


def set_disabled(conn: psycopg.Connection, name: str, disabled: bool) -> int:
    """Disable (ending its sessions) or enable an account; returns how many sessions ended."""
    with conn.transaction():
        if conn.execute("UPDATE console_users SET disabled = %s WHERE name = %s", (disabled, name)).rowcount == 0:
            raise LookupError(f"no account {name!r}")
        return sessions.end_all(conn, name, "account disabled") if disabled else 0


def list_users(conn: psycopg.Connection) -> list[Account]:
    """Every account with its last sign-in and open sessions, by name."""
    return fetch_all(conn, Account,
                     "SELECT u.name, u.role, u.disabled, u.created_at, max(s.created_at) AS last_sign_in,"
                     " count(*) FILTER (WHERE s.ended_at IS NULL) AS open_sessions FROM console_users u"
                     " LEFT JOIN console_sessions s ON s.user_name = u.name GROUP BY u.name ORDER BY u.name")


def lookup(conn: psycopg.Connection, name: str) -> Login | None:
    """The hash and role of an enabled account."""
    return fetch_one(conn, Login, "SELECT password_hash, role FROM console_users WHERE name = %s AND NOT disabled",
                     (name,))


def verify(account: Login | None, password: str) -> str | None:
    """The account's role when the password is right, else None. Costs one argon2id check (64 MiB), also for
    no account."""
    try:
        _hasher.verify(account.password_hash if account else dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return None
    return account.role if account else None


def authenticate(conn: psycopg.Connection, name: str, password: str) -> str | None:
    """The account's role when the password is right, else None."""
    return verify(lookup(conn, name), password)


def log_action(conn: psycopg.Connection, user: str, action: str, **details: object) -> int:
    """Record what `user` did in the audit trail; returns the entry's id (undo names the entry it takes back)."""
    return fetch_value(conn, "INSERT INTO console_actions (user_name, action, details) VALUES (%s, %s, %s::jsonb)"
                       " RETURNING id", (user, action, json.dumps(details, default=str)))
