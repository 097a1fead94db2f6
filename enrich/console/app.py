"""The console's FastAPI app: one router per page, sessions signed with ENRICH_CONSOLE_SECRET_KEY."""
from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.sessions import SessionMiddleware

from core.config import Settings
from enrich.console import auth, overview
from enrich.console import images as console_images
from enrich.console import listings as console_listings
from enrich.console import models as models_page
from enrich.console import review as console_review
from enrich.console.deps import render

log = logging.getLogger(__name__)
SESSION_HOURS = 12
# no inline scripts or styles, nothing from other origins, never inside a frame
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def create_app(settings: Settings, pool=None) -> FastAPI:
    """The console for these settings; `pool` (a psycopg_pool.ConnectionPool) is opened here when not given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = pool is None
        if own:
            from core.db import make_pool

            app.state.pool = make_pool(settings)
        yield
        if own:
            app.state.pool.close()

    app = FastAPI(title="catalogue-enrich console", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.settings = settings
    from core.celery_app import configure

    configure(settings)  # the overview's queue depth and the models page's sends use this broker
    app.state.pool = pool
    key = settings.console_secret_key.get_secret_value() if settings.console_secret_key else None
    if not key:
        log.warning("ENRICH_CONSOLE_SECRET_KEY is not set: sessions are signed with a random key and end when "
                    "the console restarts")
        key = secrets.token_urlsafe(48)
    app.add_middleware(SessionMiddleware, secret_key=key, session_cookie="enrich_console",
                       max_age=SESSION_HOURS * 3600, same_site="strict", https_only=settings.console_https)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(auth.LoginRequired)
    async def to_login(request: Request, _exc):
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    @app.exception_handler(HTTPException)
    async def error_page(request: Request, exc: HTTPException):
        return render(request, "error.html", status_code=exc.status_code, message=str(exc.detail),
                      user=None)

    app.mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static")), name="static")
    app.include_router(auth.router)
    app.include_router(overview.router)
    app.include_router(console_review.router)
    app.include_router(console_listings.router)
    app.include_router(console_images.router)
    app.include_router(models_page.router)
    return app
