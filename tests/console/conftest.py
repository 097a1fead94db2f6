"""The console served for real (uvicorn on a free port, the test database) and driven by Debian's Chromium
through Playwright; accounts `admin` and `reviewer` exist. Screenshots land in `$ENRICH_SCREENSHOTS` (default:
the test's tmp dir)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import sync_playwright

from core.celery_app import configure
from core.config import Settings
from core.db import make_pool
from enrich.console import auth
from enrich.console.app import create_app
from enrich.console.users import add_user
from harness.net import free_port, wait_port

CHROMIUM = os.environ.get("ENRICH_TEST_CHROMIUM", "/usr/bin/chromium")
PASSWORDS = {"admin": "admin-password-1", "reviewer": "reviewer-password-1"}
# the flags the workplace's probe uses: no sandbox as root, no background traffic on a closed network
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(autouse=True)
def _fresh_login_limits():
    """The login rate limit is per process: one test's failed sign-ins must not lock out the next test."""
    auth._failures.clear()
    yield
    auth._failures.clear()


@pytest.fixture()
def console_settings(pg_url, tmp_path):
    return Settings(database_url=pg_url, data_dir=tmp_path / "data", allow_local_paths=True,
                    console_secret_key="test-secret-key-" + "x" * 32, celery_broker_url="redis://127.0.0.1:6379/6")


@pytest.fixture()
def console_url(console_settings, db):
    """Base URL of a running console; the accounts admin and reviewer exist."""
    for name, password in PASSWORDS.items():
        add_user(db, name, password, name)
    pool = make_pool(console_settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(console_settings, pool=pool), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_port("127.0.0.1", port)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    pool.close()
    configure(Settings())  # the console configured the shared Celery app with its test broker


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def screenshots(tmp_path) -> Path:
    out = Path(os.environ.get("ENRICH_SCREENSHOTS", tmp_path / "screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def sign_in(browser, base: str, name: str, **context):
    """A fresh browser context (options: Playwright's new_context) signed in as `name`; returns its page."""
    page = browser.new_context(**{"viewport": {"width": 1280, "height": 860}, **context}).new_page()
    page.goto(f"{base}/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")
    return page
