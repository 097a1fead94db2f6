"""Sessions the server can end, against the served console over plain HTTP and in Chromium: a cookie copied
before logout, a password change or a disable is worth nothing after; idle and absolute lifetimes; a link from
another site keeps the session; POSTs from another origin are refused even with the token."""
from __future__ import annotations

import copy
import http.server
import threading
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from http.cookiejar import CookieJar

import pytest
from typer.testing import CliRunner

from enrich.cli import app
from harness.net import free_port
from tests.console.conftest import PASSWORDS, sign_in


class Client:
    """A cookie-keeping HTTP client that does not follow redirects (a redirect to /login is the answer)."""
    def __init__(self, base: str) -> None:
        self.base, self.jar = base, CookieJar()

        class _NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)

    def request(self, path: str, data: dict | None = None, headers: dict | None = None) -> tuple[int, str, Message]:
        body = None if data is None else urllib.parse.urlencode(data).encode()
        req = urllib.request.Request(self.base + path, data=body, headers={"Accept": "text/html", **(headers or {})})
        try:
            with self.opener.open(req) as resp:
                return resp.status, resp.read().decode(), resp.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace"), exc.headers

    def csrf(self, path: str = "/login") -> str:
        html = self.request(path)[1]
        return html.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]

    def sign_in(self, name: str) -> None:
        status, _, headers = self.request("/login", {"name": name, "password": PASSWORDS[name],
                                                     "csrf": self.csrf()})
        assert status == 303 and headers["location"] == "/", (status, headers)

    def cookie(self):
        """A copy of the session cookie as it is now."""
        return copy.copy(next(c for c in self.jar if c.name == "enrich_console"))

    @classmethod
    def replaying(cls, base: str, cookie) -> Client:
        """A client carrying a copied cookie (an attacker's replay)."""
        other = cls(base)
        other.jar.set_cookie(copy.copy(cookie))
        return other


def signed_in(client: Client) -> bool:
    status, _, headers = client.request("/listings")
    assert status in (200, 303), status
    return status == 200 and "location" not in headers


def test_a_cookie_copied_before_logout_reads_nothing_and_changes_nothing_after(console_url, db):
    alice = Client(console_url)
    alice.sign_in("reviewer")
    token, copied = alice.csrf("/"), alice.cookie()
    db.execute("INSERT INTO console_actions (user_name, action, details) VALUES ('reviewer', 'review.skip',"
               " '{\"review_id\": 1}')")
    assert signed_in(Client.replaying(console_url, copied))
    status, _, _ = alice.request("/logout", {"csrf": token})
    assert status == 303 and not signed_in(alice)

    thief = Client.replaying(console_url, copied)
    assert not signed_in(thief)
    status, _, headers = thief.request("/review/undo", {"csrf": token}, headers={"X-CSRF-Token": token})
    assert status in (303, 401) and headers.get("location", "/login").startswith("/login")
    assert db.execute("SELECT count(*) FROM console_actions WHERE action = 'review.undo'").fetchone()[0] == 0
    assert db.execute("SELECT end_reason FROM console_sessions WHERE user_name = 'reviewer'").fetchone()[0] == "logout"


@pytest.mark.parametrize("command", [["set-password", "reviewer", "--password-stdin"], ["disable", "reviewer"]])
def test_a_password_change_or_a_disable_ends_every_session_of_the_account(console_url, pg_url, db, command):
    phone, laptop = Client(console_url), Client(console_url)
    phone.sign_in("reviewer")
    laptop.sign_in("reviewer")
    assert signed_in(phone) and signed_in(laptop)
    res = CliRunner().invoke(app, ["console-user", *command, "--database-url", pg_url], input="another-password-2\n")
    assert res.exit_code == 0 and "2 session(s) ended" in res.output, res.output
    assert not signed_in(phone) and not signed_in(laptop)


def test_sessions_end_when_idle_too_long_or_older_than_the_lifetime(console_url, console_settings, db):
    a, b = Client(console_url), Client(console_url)
    a.sign_in("reviewer")
    b.sign_in("admin")
    idle, lifetime = console_settings.console_session_idle_s, console_settings.console_session_max_s
    db.execute("UPDATE console_sessions SET seen_at = now() - make_interval(secs => %s + 5)"
               " WHERE user_name = 'reviewer'", (idle,))
    # used all along, but signed in longer ago than the absolute lifetime
    db.execute("UPDATE console_sessions SET created_at = now() - make_interval(secs => %s + 5)"
               " WHERE user_name = 'admin'", (lifetime,))
    assert not signed_in(a) and not signed_in(b)
    c = Client(console_url)
    c.sign_in("reviewer")
    assert signed_in(c)  # and a fresh sign-in works again


def test_a_link_from_another_site_keeps_the_session(browser, console_url):
    page = sign_in(browser, console_url, "reviewer")
    port = free_port()
    link_page = f'<a id="go" href="{console_url}/listings?q=shirt">to the console</a>'.encode()

    class Site(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(link_page)

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", port), Site)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://localhost:{port}/")  # another site: localhost is not 127.0.0.1
        page.click("#go")
        page.wait_for_load_state()
        assert page.url == f"{console_url}/listings?q=shirt"
        assert "reviewer · reviewer" in page.inner_text("header")
        page.goto(f"{console_url}/review")
        assert page.url == f"{console_url}/review"  # still signed in after coming back
    finally:
        other.shutdown()


def test_login_page_while_signed_in_keeps_the_session_and_follows_next(console_url):
    c = Client(console_url)
    c.sign_in("reviewer")
    status, _, headers = c.request("/login?next=/review")
    assert status == 303 and headers["location"] == "/review" and signed_in(c)


def test_a_post_from_another_origin_is_refused_even_with_the_token(console_url, db):
    c = Client(console_url)
    c.sign_in("reviewer")
    token = c.csrf("/")
    for header in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/page"}, {"Origin": "null"}):
        status, _, _ = c.request("/logout", {"csrf": token}, headers=header)
        assert status == 403, header
    assert signed_in(c)
    status, _, _ = c.request("/logout", {"csrf": token}, headers={"Origin": console_url})
    assert status == 303 and not signed_in(c)


def test_pages_are_not_cached_and_the_policy_forbids_base_tags(console_url):
    c = Client(console_url)
    c.sign_in("reviewer")
    _, _, headers = c.request("/listings")
    assert headers["Cache-Control"] == "no-store"
    assert "base-uri 'none'" in headers["content-security-policy"]
    _, _, login = Client(console_url).request("/login")
    assert "samesite=lax" in login["set-cookie"].lower() and "httponly" in login["set-cookie"].lower()
