"""Sign-in, roles, CSRF and escaping, through a real browser and plain HTTP against the served console."""
from __future__ import annotations

import concurrent.futures
import functools
import http.client
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

from typer.testing import CliRunner

from enrich.cli import app
from enrich.console.users import add_user, authenticate
from harness.net import free_port, wait_port
from tests.console.conftest import PASSWORDS, sign_in


def test_pages_need_a_sign_in_and_the_overview_shows_the_backlog(browser, console_url, screenshots):
    page = browser.new_context().new_page()
    page.goto(f"{console_url}/")
    assert page.url.startswith(f"{console_url}/login")
    page = sign_in(browser, console_url, "reviewer")
    assert "Pending listings" in page.content() and "reviewer · reviewer" in page.inner_text("header")
    page.screenshot(path=str(screenshots / "overview.png"), full_page=True)


def test_wrong_password_is_refused_and_repeated_tries_are_rate_limited(console_url):
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    token = _csrf(opener, console_url)
    codes = []
    for _ in range(7):
        codes.append(_post(opener, f"{console_url}/login", {"name": "admin", "password": "wrong", "csrf": token}))
    assert codes[:5] == [401] * 5 and codes[5:] == [429, 429]
    # the right password is refused too while the limit holds: admin never signed in from here
    assert _post(opener, f"{console_url}/login", {"name": "admin", "password": PASSWORDS["admin"],
                                                  "csrf": token}) == 429


def test_a_correct_password_from_an_address_that_signed_in_before_lifts_the_name_lock(console_url, db):
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    token = _csrf(opener, console_url)
    good = {"name": "reviewer", "password": PASSWORDS["reviewer"], "csrf": token}
    assert _post(opener, f"{console_url}/login", good) == 200  # followed the redirect to the overview
    attacker = _opener_from("127.0.0.2")  # another address (all of 127/8 is this machine)
    bad = {"name": "reviewer", "password": "guess", "csrf": _csrf(attacker, console_url)}
    assert [_post(attacker, f"{console_url}/login", bad) for _ in range(6)] == [401] * 5 + [429]
    assert _post(attacker, f"{console_url}/login", {**bad, "password": PASSWORDS["reviewer"]}) == 429
    # the name is locked, but the real user signs in from the address that worked before
    token = _csrf(opener, console_url)
    assert _post(opener, f"{console_url}/login", {**good, "csrf": token}) == 200
    assert db.execute("SELECT count(*) FROM console_sessions WHERE user_name = 'reviewer'").fetchone()[0] == 2


def test_a_post_without_the_csrf_token_is_refused(console_url):
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    _csrf(opener, console_url)
    assert _post(opener, f"{console_url}/login", {"name": "admin", "password": PASSWORDS["admin"]}) == 403
    assert _post(opener, f"{console_url}/login", {"name": "admin", "password": PASSWORDS["admin"],
                                                  "csrf": "forged"}) == 403


def _opener_from(address: str):
    """A cookie-keeping opener whose connections come from `address`."""
    class FromAddress(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(functools.partial(http.client.HTTPConnection, source_address=(address, 0)), req)

    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()), FromAddress)


def _csrf(opener, base: str) -> str:
    with opener.open(f"{base}/login") as resp:
        html = resp.read().decode()
    return html.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def _post(opener, url: str, data: dict) -> int:
    try:
        with opener.open(urllib.request.Request(url, data=urllib.parse.urlencode(data).encode())) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_console_user_add_stores_an_argon2_hash_and_refuses_a_short_password(db, pg_url):
    res = CliRunner().invoke(app, ["console-user", "add", "dana", "--role", "admin", "--password-stdin",
                                   "--database-url", pg_url], input="a-long-password\n")
    assert res.exit_code == 0, res.output
    stored = db.execute("SELECT password_hash, role FROM console_users WHERE name = 'dana'").fetchone()
    assert stored[0].startswith("$argon2id$") and "a-long-password" not in stored[0] and stored[1] == "admin"
    assert authenticate(db, "dana", "a-long-password") == "admin" and authenticate(db, "dana", "nope") is None
    short = CliRunner().invoke(app, ["console-user", "add", "eve", "--role", "reviewer", "--password-stdin",
                                     "--database-url", pg_url], input="short\n")
    assert short.exit_code == 2 and "at least 10" in short.output


def test_console_user_list_disable_enable_and_a_bad_name_is_a_clear_message(db, pg_url):
    add_user(db, "sam", "sam-password-1", "reviewer")
    run = CliRunner().invoke
    listed = run(app, ["console-user", "list", "--database-url", pg_url])
    assert listed.exit_code == 0 and "sam" in listed.output and "enabled" in listed.output, listed.output
    assert run(app, ["console-user", "disable", "sam", "--database-url", pg_url]).exit_code == 0
    assert authenticate(db, "sam", "sam-password-1") is None
    assert "disabled" in run(app, ["console-user", "list", "--database-url", pg_url]).output
    assert run(app, ["console-user", "enable", "sam", "--database-url", pg_url]).exit_code == 0
    assert authenticate(db, "sam", "sam-password-1") == "reviewer"
    missing = run(app, ["console-user", "disable", "nobody", "--database-url", pg_url])
    assert missing.exit_code == 2 and "no account 'nobody'" in missing.output
    bad = run(app, ["console-user", "add", "<script>", "--role", "reviewer", "--password-stdin",
                    "--database-url", pg_url], input="a-long-password\n")
    assert bad.exit_code == 2 and "a name is 1–64 letters" in bad.output and "Traceback" not in bad.output
    assert bad.exception is None or isinstance(bad.exception, SystemExit)


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def test_a_storm_of_bad_logins_keeps_memory_bounded_and_the_real_user_gets_in(db, pg_url, tmp_path):
    """The console as its own process: 24 concurrent failed sign-ins with rotating names from one address.
    Each argon2id check holds 64 MiB; with at most ENRICH_CONSOLE_LOGIN_CHECKS=2 at once the peak RSS grows
    by far less than 24 checks' worth, and the real user, from another address, signs in meanwhile."""
    add_user(db, "admin", PASSWORDS["admin"], "admin")
    port = free_port()
    env = {**os.environ, "ENRICH_DATABASE_URL": pg_url, "ENRICH_CONSOLE_PORT": str(port),
           "ENRICH_CONSOLE_SECRET_KEY": "k" * 48, "ENRICH_CONSOLE_LOGIN_CHECKS": "2",
           "ENRICH_DATA_DIR": str(tmp_path), "ENRICH_CELERY_BROKER_URL": "redis://127.0.0.1:6379/6"}
    enrich = str(Path(sys.executable).with_name("enrich"))
    proc = subprocess.Popen([enrich, "console"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, timeout=120)
        base = f"http://127.0.0.1:{port}"
        attackers = [_opener_from("127.0.0.2") for _ in range(24)]
        tokens = [_csrf(o, base) for o in attackers]
        _post(attackers[0], f"{base}/login", {"name": "warm-up", "password": "x", "csrf": tokens[0]})
        before = _peak_rss_mib(proc.pid)
        with concurrent.futures.ThreadPoolExecutor(len(attackers)) as pool:
            codes = list(pool.map(lambda i: _post(attackers[i], f"{base}/login", {
                "name": f"bot-{i}", "password": "guess", "csrf": tokens[i]}), range(len(attackers))))
            real = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
            mine = _post(real, f"{base}/login", {"name": "admin", "password": PASSWORDS["admin"],
                                                 "csrf": _csrf(real, base)})
        grew = _peak_rss_mib(proc.pid) - before
        assert all(c in (401, 429, 503) for c in codes), codes
        assert mine == 200  # signed in: followed the redirect to the overview
        assert grew < 3 * 64, f"peak RSS grew by {grew:.0f} MiB during 24 concurrent password checks"
    finally:
        proc.terminate()
        proc.wait(30)
