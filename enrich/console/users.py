"""Console accounts in Postgres (argon2id hashes) and the audit trail of what each person did."""
from __future__ import annotations

import json
import re

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from enrich.console import sessions

ROLES = ("reviewer", "admin")
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")  # the table's CHECK
MIN_PASSWORD = 10
_hasher = PasswordHasher()
# verifying against this keeps a login for an unknown name as slow as one for a known name
_DUMMY_HASH = _hasher.hash("no such user")


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


def list_users(conn: psycopg.Connection) -> list[tuple]:
    """(name, role, disabled, created_at, last sign-in, open sessions) per account."""
    return conn.execute(
        "SELECT u.name, u.role, u.disabled, u.created_at, max(s.created_at),"
        " count(*) FILTER (WHERE s.ended_at IS NULL) FROM console_users u"
        " LEFT JOIN console_sessions s ON s.user_name = u.name GROUP BY u.name ORDER BY u.name").fetchall()


def lookup(conn: psycopg.Connection, name: str) -> tuple[str, str] | None:
    """(password hash, role) of an enabled account."""
    row = conn.execute("SELECT password_hash, role FROM console_users WHERE name = %s AND NOT disabled",
                       (name,)).fetchone()
    return (row[0], row[1]) if row else None


def verify(account: tuple[str, str] | None, password: str) -> str | None:
    """The account's role when the password is right, else None. Costs one argon2id check (64 MiB), also for
    no account."""
    try:
        _hasher.verify(account[0] if account else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    return account[1] if account else None


def authenticate(conn: psycopg.Connection, name: str, password: str) -> str | None:
    """The account's role when the password is right, else None."""
    return verify(lookup(conn, name), password)


def log_action(conn: psycopg.Connection, user: str, action: str, **details) -> None:
    conn.execute("INSERT INTO console_actions (user_name, action, details) VALUES (%s, %s, %s::jsonb)",
                 (user, action, json.dumps(details, default=str)))
