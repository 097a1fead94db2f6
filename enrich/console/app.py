"""The console's FastAPI app: one router per page, sessions signed with ENRICH_CONSOLE_SECRET_KEY."""
from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from psycopg_pool import ConnectionPool
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware

from core.celery_app import configure
from core.config import Settings
from core.db import make_pool
from enrich.console import auth, overview, users
from enrich.console import images as console_images
from enrich.console import listings as console_listings
from enrich.console import models as models_page
from enrich.console import review as console_review
from enrich.console.deps import render
from enrich.console.text_guard import TextGuard

log = logging.getLogger(__name__)
# no inline scripts or styles, nothing from other origins, never inside a frame
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self';"
                               " base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def create_app(settings: Settings, pool: ConnectionPool[Any] | None = None) -> FastAPI:
    """The console for these settings; `pool` (a psycopg_pool.ConnectionPool) is opened here when not given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = pool is None
        if own:
            app.state.pool = make_pool(settings)
        users.dummy_hash()  # made before the first sign-in: an unknown name then costs one hash like any other
        yield
        if own:
            app.state.pool.close()

    app = FastAPI(title="catalogue-enrich console", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.settings = settings
    configure(settings)  # the overview's queue depth and the models page's sends use this broker
    app.state.pool = pool
    key = settings.console_secret_key.get_secret_value() if settings.console_secret_key else None
    if not key:
        log.warning("ENRICH_CONSOLE_SECRET_KEY is not set: sessions are signed with a random key and end when "
                    "the console restarts")
        key = secrets.token_urlsafe(48)
    # Lax: a link from another site keeps the session (POSTs are guarded by the CSRF token and the origin)
    app.add_middleware(SessionMiddleware, secret_key=key, session_cookie="enrich_console",
                       max_age=int(settings.console_session_max_s), same_site="lax",
                       https_only=settings.console_https)
    app.add_middleware(TextGuard)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if response.headers.get("content-type", "").startswith("text/html"):
            response.headers["Cache-Control"] = "no-store"  # pages show data a shared cache must not keep
        return response

    @app.exception_handler(auth.LoginRequired)
    async def to_login(request: Request, _exc: Exception) -> Response:
        if not _wants_html(request):  # the page's scripts: they say "signed out" themselves
            return PlainTextResponse("Signed out: sign in again.", status_code=401)
        back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            back = _same_origin_path(request.headers.get("referer", ""), auth.own_origin(request))
        return RedirectResponse(f"/login?next={quote(back, safe='')}", status_code=303)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = str(exc.detail) if exc.status_code != 404 or exc.detail != "Not Found" else \
            "There is no page at this address."
        return await run_in_threadpool(_error_page, request, exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}"
                            for e in exc.errors())
        return await run_in_threadpool(_error_page, request, 422, f"This request is not valid ({message}).")

    @app.exception_handler(psycopg.errors.DataError)
    async def unstorable(request: Request, exc: psycopg.errors.DataError) -> Response:
        log.info("%s %s: a value the database refuses: %s", request.method, request.url.path, exc)
        return await run_in_threadpool(_error_page, request, 400, "A value in this request is out of range.")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return PlainTextResponse("Something went wrong on the console's side; it is in the console's log.",
                                 status_code=500)

    app.mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static")), name="static")
    app.include_router(auth.router)
    app.include_router(overview.router)
    app.include_router(console_review.router)
    app.include_router(console_listings.router)
    app.include_router(console_images.router)
    app.include_router(models_page.router)
    return app


_TITLES = {400: "Not a valid request", 401: "Signed out", 403: "Not allowed", 404: "Not found",
           405: "Not allowed here", 409: "Changed meanwhile", 422: "Not a valid request", 429: "Too many requests"}


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def _error_page(request: Request, status: int, message: str) -> Response:
    if not _wants_html(request):
        return PlainTextResponse(message, status_code=status)
    user = auth.user_or_none(request)
    return render(request, "error.html", user=user, status_code=status, message=message,
                  title=_TITLES.get(status, "Something went wrong"))


def _same_origin_path(referer: str, origin: str) -> str:
    """The page a form was posted from, when it is this console's; else the overview."""
    if referer.startswith(origin + "/"):
        return referer[len(origin):]
    return "/"
