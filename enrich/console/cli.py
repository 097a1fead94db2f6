"""`enrich console` (serve the pages) and `enrich console-user add` (accounts)."""
from __future__ import annotations

import sys

import typer

from core.config import get_settings
from core.options import DatabaseUrl

users_app = typer.Typer(help="Console accounts (names, roles, passwords).", no_args_is_help=True)


def console(
    host: str = typer.Option(None, "--host", help="Address to listen on (default: ENRICH_CONSOLE_HOST, 127.0.0.1)."),
    port: int = typer.Option(None, "--port", min=1, max=65535,
                             help="Port (default: ENRICH_CONSOLE_PORT, 8080)."),
) -> None:
    """Serve the browser console for reviewers and admins (review queue, listings, models)."""
    import uvicorn

    from enrich.console.app import create_app

    settings = get_settings(console_host=host, console_port=port)
    typer.echo(f"console on http://{settings.console_host}:{settings.console_port}/ "
               f"(accounts: enrich console-user add NAME --role reviewer|admin)")
    uvicorn.run(create_app(settings), host=settings.console_host, port=settings.console_port,
                log_level="info", proxy_headers=settings.console_https)


@users_app.command("add")
def add(
    name: str = typer.Argument(..., help="Sign-in name (letters, digits, . _ @ -)."),
    role: str = typer.Option(..., "--role", help="reviewer (review queue, corrections) or admin (also models: "
                                                 "promote, roll back, retrain)."),
    password_stdin: bool = typer.Option(False, "--password-stdin",
                                        help="Read the password from standard input (default: ask twice)."),
    database_url: DatabaseUrl = None,
) -> None:
    """Create an account, or reset its password and role."""
    from core.db import connect, database_url as resolve
    from enrich.console.users import add_user
    from migrations import apply_all

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    conn = connect(database_url or resolve(get_settings()), autocommit=True)
    try:
        apply_all(conn)
        add_user(conn, name, password, role)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    finally:
        conn.close()
    typer.echo(f"{name} can sign in as {role}")


def register(app: typer.Typer) -> None:
    """Add the console's commands to the root `enrich` app."""
    app.command("console")(console)
    app.add_typer(users_app, name="console-user")
