"""`enrich console` (serve the pages) and `enrich console-user add | list | disable | enable | set-password`
(accounts)."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import psycopg
import typer
import uvicorn
from rich.console import Console
from rich.table import Table

from core.config import Settings, get_settings
from core.db import connect
from core.db import database_url as resolve_url
from core.options import DatabaseUrl
from enrich.console import users
from migrations import apply_all

PasswordStdin = Annotated[bool, typer.Option("--password-stdin",
                                             help="Read the password from standard input (default: ask twice).")]
users_app = typer.Typer(help="Console accounts (names, roles, passwords).", no_args_is_help=True)


def console(
    host: str = typer.Option(None, "--host", help="Address to listen on (default: ENRICH_CONSOLE_HOST, 127.0.0.1)."),
    port: int = typer.Option(None, "--port", min=1, max=65535,
                             help="Port (default: ENRICH_CONSOLE_PORT, 8080)."),
) -> None:
    """Serve the browser console for reviewers and admins (review queue, listings, models)."""
    settings = get_settings(console_host=host, console_port=port)
    typer.echo(f"console on http://{settings.console_host}:{settings.console_port}/ "
               f"(accounts: enrich console-user add NAME --role reviewer|admin)")
    serve(settings, log_level="info")


def serve(settings: Settings, log_level: str = "warning") -> None:
    """Serve the console until interrupted."""
    from enrich.console.app import create_app  # lazy: the console's pages load torch (heat maps, shadow answers)

    uvicorn.run(create_app(settings), host=settings.console_host, port=settings.console_port, log_level=log_level,
                proxy_headers=settings.console_https)


def _password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return typer.prompt("password", hide_input=True, confirmation_prompt=True)


@contextmanager
def _accounts(url: str | None, settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """A migrated database connection; a refused change ends the command with its reason, not a traceback."""
    conn = connect(url or resolve_url(settings), autocommit=True)
    try:
        apply_all(conn)
        yield conn
    except (ValueError, LookupError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        conn.close()


@users_app.command("add")
def add(
    name: str = typer.Argument(..., help="Sign-in name (letters, digits, . _ @ -)."),
    role: str = typer.Option(..., "--role", help="reviewer (review queue, corrections) or admin (also models: "
                                                 "promote, roll back, retrain)."),
    password_stdin: PasswordStdin = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an account, or reset its password and role (ending its sessions)."""
    password = _password(password_stdin)
    with _accounts(database_url, get_settings()) as conn:
        users.add_user(conn, name, password, role)
    typer.echo(f"{name} can sign in as {role}")


@users_app.command("list")
def list_accounts(database_url: DatabaseUrl = None) -> None:
    """Every account: role, enabled or not, last sign-in, open sessions."""
    with _accounts(database_url, get_settings()) as conn:
        accounts = users.list_users(conn)
    table = Table("name", "role", "state", "created", "last sign-in", "open sessions")
    for a in accounts:
        table.add_row(a.name, a.role, "disabled" if a.disabled else "enabled", f"{a.created_at:%Y-%m-%d}",
                      f"{a.last_sign_in:%Y-%m-%d %H:%M}" if a.last_sign_in else "never", str(a.open_sessions))
    Console().print(table)


@users_app.command("disable")
def disable(name: str = typer.Argument(..., help="Account to disable."), database_url: DatabaseUrl = None) -> None:
    """Stop an account from signing in and end its sessions at once."""
    with _accounts(database_url, get_settings()) as conn:
        ended = users.set_disabled(conn, name, True)
    typer.echo(f"{name} is disabled; {ended} session(s) ended")


@users_app.command("enable")
def enable(name: str = typer.Argument(..., help="Account to enable."), database_url: DatabaseUrl = None) -> None:
    """Let a disabled account sign in again."""
    with _accounts(database_url, get_settings()) as conn:
        users.set_disabled(conn, name, False)
    typer.echo(f"{name} can sign in again")


@users_app.command("set-password")
def set_password(
    name: str = typer.Argument(..., help="Account whose password changes."),
    password_stdin: PasswordStdin = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Change a password; the account's sessions end (it signs in again with the new one)."""
    password = _password(password_stdin)
    with _accounts(database_url, get_settings()) as conn:
        ended = users.set_password(conn, name, password)
    typer.echo(f"password of {name} changed; {ended} session(s) ended")


def register(app: typer.Typer) -> None:
    """Add the console's commands to the root `enrich` app."""
    app.command("console")(console)
    app.add_typer(users_app, name="console-user")
