"""Login, sessions and CSRF: a signed HttpOnly cookie naming a server-side session (enrich.console.sessions),
a CSRF token per session checked on every state-changing request behind a same-origin check, roles, and
limits on password checks.

Login limits. Each argon2id check holds 64 MiB, so at most `console_login_checks` run at once (others wait
without holding a thread, then get 503). An address with `console_login_address_failures` failures in 10
minutes, whatever the names, is refused for a while. A name with LOGIN_NAME_FAILURES failures in a minute,
from anywhere, is locked, except for a sign-in from an address that name signed in from before: an attacker
elsewhere cannot lock the real user out, and a correct password from such an address lifts the lock.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import defaultdict, deque
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse

from enrich.console import sessions, users
from enrich.console.deps import connection, csrf_token, render
from enrich.console.sessions import User

log = logging.getLogger(__name__)
router = APIRouter()
LOGIN_NAME_FAILURES, LOGIN_NAME_WINDOW_S = 5, 60.0
LOGIN_ADDRESS_WINDOW_S = 600.0
LOGIN_WAIT_S = 10.0  # longest wait for a free password check before 503


class LoginRequired(Exception):
    """Raised by the `current_user` dependency; the app answers with a redirect to /login (401 to scripts)."""


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


async def check_csrf(request: Request) -> None:
    """Every POST comes from this console's pages (Origin, else Referer, when the browser sends one) and
    carries the session's token (form field `csrf` or header X-CSRF-Token)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    origin = request.headers.get("origin")
    if origin is None and request.headers.get("referer"):
        parts = urlsplit(request.headers["referer"])
        origin = f"{parts.scheme}://{parts.netloc}"
    if origin is not None and origin != own_origin(request):
        log.warning("POST %s refused: origin %r is not this console", request.url.path, origin)
        raise HTTPException(status_code=403, detail="this request came from another site")
    sent = request.headers.get("x-csrf-token")
    if sent is None:
        field = (await request.form()).get("csrf")
        sent = field if isinstance(field, str) else None  # an uploaded file is no token
    expected = request.session.get("csrf")
    if not expected and request.url.path != "/login":
        raise LoginRequired()  # no session at all (cookie gone or expired): signed out, not forged
    if not expected or not sent or not hmac.compare_digest(sent.encode(), str(expected).encode()):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token: reload the page")


def user_or_none(request: Request) -> User | None:
    """The signed-in user of a live session; a session that ended is forgotten (the cookie is cleared)."""
    sid = request.session.get("sid")
    if not isinstance(sid, str):
        return None
    settings = request.app.state.settings
    with connection(request) as conn:
        found = sessions.check(conn, sid, settings.console_session_idle_s, settings.console_session_max_s)
    if found is None:
        request.session.clear()
    return found


def current_user(request: Request) -> User:
    user = user_or_none(request)
    if user is None:
        raise LoginRequired()
    return user


def require_admin(user: User = Depends(current_user)) -> User:
    if not user.is_admin:
        raise HTTPException(status_code=403, detail="admins only")
    return user


class _Failures:
    """Recent failed sign-ins per name and per address (per console process)."""

    def __init__(self) -> None:
        self.by_name: dict[str, deque[float]] = defaultdict(deque)
        self.by_address: dict[str, deque[float]] = defaultdict(deque)

    @staticmethod
    def _recent(q: deque[float], window: float) -> int:
        now = time.monotonic()
        while q and now - q[0] > window:
            q.popleft()
        return len(q)

    def name_locked(self, name: str) -> bool:
        return self._recent(self.by_name[name], LOGIN_NAME_WINDOW_S) >= LOGIN_NAME_FAILURES

    def address_blocked(self, address: str, limit: int) -> bool:
        return self._recent(self.by_address[address], LOGIN_ADDRESS_WINDOW_S) >= limit

    def failed(self, name: str, address: str) -> None:
        now = time.monotonic()
        self.by_name[name].append(now)
        self.by_address[address].append(now)

    def succeeded(self, name: str) -> None:
        self.by_name.pop(name, None)

    def clear(self) -> None:
        self.by_name.clear()
        self.by_address.clear()


_failures = _Failures()


def _checks(app) -> asyncio.Semaphore:
    sem = getattr(app.state, "login_checks", None)
    if sem is None:
        sem = app.state.login_checks = asyncio.Semaphore(app.state.settings.console_login_checks)
    return sem


def _safe_next(next: str) -> str:
    return next if next.startswith("/") and not next.startswith("//") and "\\" not in next else "/"


@router.get("/login")
def login_page(request: Request, next: str = "/"):
    if user_or_none(request) is not None:  # signed in already: never hand out an anonymous cookie instead
        return RedirectResponse(_safe_next(next), status_code=303)
    return render(request, "login.html", next=_safe_next(next), error=None)


@router.post("/login", dependencies=[Depends(check_csrf)])
async def login(request: Request, name: str = Form(..., max_length=64), password: str = Form(..., max_length=1024),
                next: str = Form("/", max_length=2048)):
    address = request.client.host if request.client else "?"
    settings = request.app.state.settings

    def refuse(error: str, status: int):
        return render(request, "login.html", next=_safe_next(next), error=error, status_code=status)

    if _failures.address_blocked(address, settings.console_login_address_failures):
        log.warning("login refused for %r: too many failures from %s", name, address)
        return refuse("Too many failed sign-ins from this address: wait a few minutes.", 429)

    def account():
        with connection(request) as conn:
            locked = _failures.name_locked(name) and not sessions.known_address(conn, name, address)
            return locked, users.lookup(conn, name)

    locked, found = await run_in_threadpool(account)
    if locked:
        log.warning("login refused for %r from %s: the name is locked after failed sign-ins", name, address)
        return refuse("Too many failed sign-ins for this name: wait a minute.", 429)
    try:
        await asyncio.wait_for(_checks(request.app).acquire(), LOGIN_WAIT_S)
    except TimeoutError:
        return refuse("The console is busy signing people in: try again in a moment.", 503)
    try:
        role = await run_in_threadpool(users.verify, found, password)
    finally:
        _checks(request.app).release()
    if role is None:
        _failures.failed(name, address)
        log.info("failed login for %r from %s", name, address)
        return refuse("Wrong name or password.", 401)
    _failures.succeeded(name)

    def open_session() -> str:
        with connection(request) as conn:
            users.log_action(conn, name, "login", address=address)
            sessions.forget_old(conn)
            return sessions.start(conn, name, address)

    sid = await run_in_threadpool(open_session)
    request.session.clear()  # a fresh session (and CSRF token) after login
    request.session["sid"] = sid
    csrf_token(request)
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout", dependencies=[Depends(check_csrf)])
def logout(request: Request):
    sid = request.session.get("sid")
    if isinstance(sid, str):
        with connection(request) as conn:
            sessions.end(conn, sid, "logout")
    request.session.clear()
    return RedirectResponse("/login", status_code=303)
