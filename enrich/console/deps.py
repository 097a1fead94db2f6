"""What every page needs: a database connection from the app's pool, and template rendering with the
signed-in user and the CSRF token filled in."""
from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from fastapi import Request
from fastapi.responses import Response
from fastapi.templating import Jinja2Templates

from enrich.console.sessions import User

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))  # autoescaping on


# Browsers resolve the dot segments `.` and `..` (even percent-encoded) out of a path, so URLs for those two
# listing ids carry the id in the query string.
def listing_href(listing_id: str) -> str:
    """The listing page's URL."""
    if listing_id in (".", ".."):
        return f"/listing?id={quote(listing_id, safe='')}"
    return f"/listings/{quote(listing_id, safe='')}"


def thumb_href(listing_id: str, n: int) -> str:
    """The URL of the listing's n-th photo thumbnail."""
    if listing_id in (".", ".."):
        return f"/img?id={quote(listing_id, safe='')}&n={n}"
    return f"/img/{quote(listing_id, safe='')}/{n}"


templates.env.globals.update(listing_href=listing_href, thumb_href=thumb_href)


@contextmanager
def connection(request: Request) -> Iterator[psycopg.Connection[Any]]:
    """A pooled connection in autocommit mode (write paths open their own transactions)."""
    with request.app.state.pool.connection() as conn:
        conn.autocommit = True
        yield conn


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use; every form and the JS POST helper send it back."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


def render(request: Request, name: str, *, user: User | None = None, status_code: int = 200,
           **context: object) -> Response:
    return templates.TemplateResponse(request, name, {"user": user, "csrf": csrf_token(request), **context},
                                      status_code=status_code)
