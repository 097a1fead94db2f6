"""No input gives a 5xx: random unicode (NUL, lone surrogates, RTL overrides, dot segments, markup) in every
path, query and form parameter of every route, posted by a signed-in admin with a valid CSRF token, against
the served console."""
from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar

from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enrich.console.app import create_app
from tests.console.conftest import PASSWORDS

# query parameters read from request.query_params rather than declared on the route
_UNDECLARED_QUERY = {"/review": ("group", "category", "model"), "/review/item": ("group", "category", "model")}
_NOT_FUZZED = {"/logout", "/login", "/static"}  # ending the fuzzer's own session; static files
_NASTY = ["\x00", "a\x00b", "\ud800", "\udfff", "..", ".", "../../etc/passwd", "%00", "<script>alert(1)</script>",
          "\u202eevil", "'; DROP TABLE listings; --", "\ufeff", " ", "9" * 40, "-1", "NaN"]
text = st.one_of(st.sampled_from(_NASTY), st.text(st.characters(exclude_categories=()), max_size=80))


def routes(console_settings) -> list[tuple[str, str, list[str], list[str], list[str]]]:
    """(method, path, path params, query params, form params) of every console route."""
    def walk(items):  # FastAPI ≥ 0.165 keeps included routers as branches (no prefixes in the console)
        for r in items:
            yield from walk(r.original_router.routes) if hasattr(r, "original_router") else (r,)

    found = []
    for route in walk(create_app(console_settings).routes):  # no server: no pool is opened
        if not isinstance(route, APIRoute) or route.path in _NOT_FUZZED:
            continue
        d = route.dependant
        query = [p.alias for p in d.query_params] + list(_UNDECLARED_QUERY.get(route.path, ()))
        form = [p.alias for p in d.body_params]
        for method in (route.methods or set()) - {"HEAD"}:
            found.append((method, route.path, [p.alias for p in d.path_params], query, form))
    return sorted(found)


def _bytes(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")  # a lone surrogate as a careless client would send it


def _send(opener, url: str, form: dict | None, token: str) -> int:
    data = None
    if form is not None:
        data = urllib.parse.urlencode({"csrf": token, **{k: _bytes(v) for k, v in form.items()}}).encode()
    req = urllib.request.Request(url, data=data, headers={"X-CSRF-Token": token, "Accept": "text/html"})
    try:
        with opener.open(req) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _admin(base: str):
    """An opener signed in as admin, and its CSRF token."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    with opener.open(f"{base}/login") as resp:
        token = resp.read().decode().split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert _send(opener, f"{base}/login", {"name": "admin", "password": PASSWORDS["admin"]}, token) == 200
    with opener.open(f"{base}/") as resp:
        return opener, resp.read().decode().split('name="csrf-token" content="', 1)[1].split('"', 1)[0]


def test_random_unicode_in_every_parameter_of_every_route_never_gives_a_5xx(console_url, console_settings):
    table = routes(console_settings)
    assert len(table) >= 15 and any(m == "POST" for m, *_ in table)
    opener, token = _admin(console_url)

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def every_route(data):
        failures = []
        for method, path, path_params, query, form in table:
            url = path
            for name in path_params:
                url = url.replace("{" + name + "}", urllib.parse.quote(_bytes(data.draw(text, name)), safe=""))
            params = {name: _bytes(data.draw(text, name)) for name in query}
            full = console_url + url + ("?" + urllib.parse.urlencode(params) if params else "")
            body = {name: data.draw(text, name) for name in form} if method == "POST" else None
            status = _send(opener, full, body, token)
            if status >= 500:
                failures.append((method, full, body, status))
        assert not failures, failures

    every_route()
    # the fuzzer was signed in all along: its requests reached the handlers, not the login page
    assert _send(opener, f"{console_url}/models", None, token) == 200


def test_a_nul_is_refused_at_the_edge_with_a_plain_message(console_url, db):
    opener, token = _admin(console_url)
    for url, form in ((f"{console_url}/listings?q=a%00b", None), (f"{console_url}/listings/a%00b", None),
                      (f"{console_url}/review?group=%ED%A0%80", None),
                      (f"{console_url}/listings/x/correct", {"group": "colour", "value": "red\x00"})):
        try:
            data = None if form is None else urllib.parse.urlencode({"csrf": token, **form}).encode()
            opener.open(urllib.request.Request(url, data=data, headers={"X-CSRF-Token": token}))
            raise AssertionError(f"{url} was accepted")
        except urllib.error.HTTPError as exc:
            body = exc.read().decode()
            assert exc.code == 400 and body.startswith("Not accepted: the "), (url, exc.code, body)
    assert db.execute("SELECT count(*) FROM corrections").fetchone()[0] == 0


def test_a_csrf_token_with_non_ascii_text_is_refused_not_a_crash(console_url, db):
    """A wrong token is a 403 whatever its characters (comparing it must not fail on non-ASCII text)."""
    opener, token = _admin(console_url)
    for forged in ("é" + token[1:], "\u202e" * 8):
        data = urllib.parse.urlencode({"csrf": forged, "group": "colour", "value": "red"}).encode()
        try:
            opener.open(urllib.request.Request(f"{console_url}/listings/x/correct", data=data))
            raise AssertionError("a forged token was accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 403, (forged, exc.code)
    assert db.execute("SELECT count(*) FROM corrections").fetchone()[0] == 0
