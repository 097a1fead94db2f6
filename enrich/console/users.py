"""Console accounts in Postgres (argon2id hashes) and the audit trail of what each person did."""
from __future__ import annotations

import json

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ROLES = ("reviewer", "admin")
_hasher = PasswordHasher()
# verifying against this keeps a login for an unknown name as slow as one for a known name
_DUMMY_HASH = _hasher.hash("no such user")


def add_user(conn: psycopg.Connection, name: str, password: str, role: str) -> None:
    """Create an account, or reset its password and role."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if len(password) < 10:
        raise ValueError("a password needs at least 10 characters")
    conn.execute("INSERT INTO console_users (name, password_hash, role) VALUES (%s, %s, %s)"
                 " ON CONFLICT (name) DO UPDATE SET password_hash = EXCLUDED.password_hash, role = EXCLUDED.role,"
                 " disabled = false", (name, _hasher.hash(password), role))


def authenticate(conn: psycopg.Connection, name: str, password: str) -> str | None:
    """The account's role when the password is right, else None."""
    row = conn.execute("SELECT password_hash, role FROM console_users WHERE name = %s AND NOT disabled",
                       (name,)).fetchone()
    try:
        _hasher.verify(row[0] if row else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    return row[1] if row else None


def role_of(conn: psycopg.Connection, name: str) -> str | None:
    row = conn.execute("SELECT role FROM console_users WHERE name = %s AND NOT disabled", (name,)).fetchone()
    return row[0] if row else None


def log_action(conn: psycopg.Connection, user: str, action: str, **details) -> None:
    conn.execute("INSERT INTO console_actions (user_name, action, details) VALUES (%s, %s, %s::jsonb)",
                 (user, action, json.dumps(details, default=str)))
