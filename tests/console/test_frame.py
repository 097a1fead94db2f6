"""The frame around every page: error pages that keep the navigation and never show JSON, the login redirect
that keeps where the person was going, and a header that fits a phone."""
from __future__ import annotations

import urllib.parse

from tests.console.conftest import sign_in
from tests.console.test_sessions import Client


def test_error_pages_keep_the_navigation_and_never_show_json(console_url):
    c = Client(console_url)
    c.sign_in("reviewer")
    status, html, headers = c.request("/no/such/page")
    assert status == 404 and headers["content-type"].startswith("text/html")
    assert 'href="/review"' in html and "There is no page at this address." in html
    status, html, headers = c.request("/review/abc/skip", {"csrf": c.csrf("/")})
    assert status == 422 and headers["content-type"].startswith("text/html") and "not valid" in html
    assert not html.lstrip().startswith("{") and 'href="/listings"' in html


def test_the_login_redirect_keeps_the_query_string(console_url):
    status, _, headers = Client(console_url).request("/review?group=colour&model=v1")
    assert status == 303
    assert urllib.parse.unquote(headers["location"]) == "/login?next=/review?group=colour&model=v1"


def test_the_header_fits_a_phone_and_the_error_page_keeps_it(browser, console_url, screenshots):
    page = sign_in(browser, console_url, "reviewer")
    page.set_viewport_size({"width": 390, "height": 800})
    page.goto(f"{console_url}/listings/no-such-listing")
    assert "Not found" in page.inner_text("main")
    page.screenshot(path=str(screenshots / "console-phone-header.png"))
    boxes = [page.locator(sel).bounding_box() for sel in ("header .brand", "header nav", "header .who")]
    for n, a in enumerate(boxes):
        assert a["x"] >= 0 and a["x"] + a["width"] <= 390, (n, a)
        for b in boxes[n + 1:]:
            apart = (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                     or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])
            assert apart, (a, b)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    rows = {round(page.locator("header nav a").nth(n).bounding_box()["y"]) for n in range(4)}
    assert len(rows) == 1, "the navigation links wrap into a column"
    page.click("header nav >> text=Review")
    page.wait_for_url(f"{console_url}/review")
    page.set_viewport_size({"width": 1280, "height": 860})
    page.goto(f"{console_url}/listings/no-such-listing")
    page.screenshot(path=str(screenshots / "console-error.png"))

