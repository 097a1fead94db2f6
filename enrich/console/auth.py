"""Login, sessions and CSRF: signed HttpOnly session cookies, a CSRF token per session checked on every
state-changing request, roles, and a login rate limit."""
from __future__ import annotations

import hmac
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse

from enrich.console import users
from enrich.console.deps import connection, csrf_token, render

log = logging.getLogger(__name__)
router = APIRouter()
LOGIN_ATTEMPTS, LOGIN_WINDOW_S = 5, 60.0  # per client address and name


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class LoginRequired(Exception):
    """Raised by the `current_user` dependency; the app answers with a redirect to /login."""


async def check_csrf(request: Request) -> None:
    """Every POST carries the session's token (form field `csrf` or header X-CSRF-Token)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    sent = request.headers.get("x-csrf-token")
    if sent is None:
        form = await request.form()
        sent = form.get("csrf")
    expected = request.session.get("csrf")
    if not expected or not sent or not hmac.compare_digest(str(sent), expected):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token: reload the page")


def current_user(request: Request) -> User:
    name = request.session.get("user")
    if not name:
        raise LoginRequired()
    with connection(request) as conn:
        role = users.role_of(conn, name)
    if role is None:  # disabled or deleted since the login
        request.session.clear()
        raise LoginRequired()
    return User(name, role)


def require_admin(user: User = Depends(current_user)) -> User:
    if not user.is_admin:
        raise HTTPException(status_code=403, detail="admins only")
    return user


class _RateLimit:
    def __init__(self) -> None:
        self.failures: dict[tuple[str, str], deque[float]] = defaultdict(deque)

    def allowed(self, key: tuple[str, str]) -> bool:
        q, now = self.failures[key], time.monotonic()
        while q and now - q[0] > LOGIN_WINDOW_S:
            q.popleft()
        return len(q) < LOGIN_ATTEMPTS

    def failed(self, key: tuple[str, str]) -> None:
        self.failures[key].append(time.monotonic())


_limits = _RateLimit()


@router.get("/login")
def login_page(request: Request, next: str = "/"):
    return render(request, "login.html", next=next if next.startswith("/") else "/", error=None)


@router.post("/login", dependencies=[Depends(check_csrf)])
def login(request: Request, name: str = Form(...), password: str = Form(...), next: str = Form("/")):
    key = (request.client.host if request.client else "?", name)
    if not _limits.allowed(key):
        log.warning("login rate limit hit for %r from %s", name, key[0])
        return render(request, "login.html", next=next, error="Too many attempts: wait a minute.", status_code=429)
    with connection(request) as conn:
        role = users.authenticate(conn, name, password)
        if role is None:
            _limits.failed(key)
            log.info("failed login for %r from %s", name, key[0])
            return render(request, "login.html", next=next, error="Wrong name or password.", status_code=401)
        users.log_action(conn, name, "login")
    request.session.clear()  # a fresh session (and CSRF token) after login
    request.session["user"] = name
    csrf_token(request)
    return RedirectResponse(next if next.startswith("/") and not next.startswith("//") else "/", status_code=303)


@router.post("/logout", dependencies=[Depends(check_csrf)])
def logout(request: Request):
    request.session.clear()
    return RedirectResponse("/login", status_code=303)
