"""The newcomer's first look: the quickstart's catalogue in the console shows its real photos (review card,
listing page, similar-items shelf) although the console runs with local paths off: the photos are the
installation's own files under the data directory."""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from PIL import Image, ImageStat
from rich.console import Console

from core.config import Settings
from enrich.console.review import reason_sentence
from enrich.quickstart import run_quickstart
from harness.models import save_small_model
from harness.net import free_port, wait_port
from schemas.enrichment import ReviewReason
from tests.console.conftest import sign_in


@pytest.fixture()
def quickstart_data(db, pg_url, tmp_path, fmnist_dir):
    """The quickstart run on the test database (its model: a small one, saved where the quickstart reuses it)."""
    data = tmp_path / "data"
    model = save_small_model(tmp_path / "model", "quickstart-test", seed=0, colour_threshold=0.9)  # colour → review
    shutil.copytree(model, data / "models" / "quickstart-test")
    out = run_quickstart(Settings(data_dir=data, database_url=pg_url), fmnist_dir, items=24, examples=1,
                         console=Console(file=io.StringIO()))
    assert out["enriched"] == 24
    return data


@pytest.fixture()
def console_settings(pg_url, quickstart_data):
    settings = Settings(database_url=pg_url, data_dir=quickstart_data, console_secret_key="test-secret-key-" + "x" * 32,
                        celery_broker_url="redis://127.0.0.1:6379/6")
    assert not settings.allow_local_paths  # the default: photos must come through as the installation's own
    return settings


def _real_photo(page, base: str, src: str) -> Image.Image:
    """The thumbnail behind `src`, decoded; fails on the grey placeholder."""
    res = page.request.get(base + src)
    assert res.status == 200 and "x-thumbnail" not in res.headers, (src, res.headers)
    img = Image.open(io.BytesIO(res.body()))
    assert img.format == "JPEG" and max(ImageStat.Stat(img).stddev) > 5, src  # a photo, not a flat fill
    return img


def test_the_quickstart_catalogue_shows_real_photos_in_the_console(browser, console_url, db, screenshots):
    page = sign_in(browser, console_url, "admin")
    page.goto(f"{console_url}/review")
    card = page.locator("#rv-current img")
    assert card.count() >= 1
    for n in range(card.count()):
        _real_photo(page, console_url, card.nth(n).get_attribute("src"))
    page.wait_for_function("() => [...document.querySelectorAll('#rv-current img')].every(i => i.naturalWidth > 0)")
    page.screenshot(path=str(screenshots / "console-review.png"))

    listing = page.locator("#rv-current").get_attribute("data-listing")
    page.goto(f"{console_url}/listings/{listing}")
    photos = page.locator(".ls-head img")
    assert photos.count() >= 1
    _real_photo(page, console_url, photos.first.get_attribute("src"))
    shelf = page.locator(".ls-shelf-item img")
    assert shelf.count() >= 3
    for n in range(3):
        _real_photo(page, console_url, shelf.nth(n).get_attribute("src"))


def test_each_review_reason_on_the_quickstart_data_matches_its_stored_evidence(browser, console_url, db):
    """Walk the queue (skip after skip): every card's reason is the sentence of the rule stored with the item,
    and that rule holds on the stored evidence — a text conflict's words are in the listing's text and name
    another value than the photo's; a below-threshold guess is the top candidate, under its threshold."""
    page = sign_in(browser, console_url, "admin")
    page.goto(f"{console_url}/review")
    seen = set()
    for _ in range(40):
        item = page.locator("#rv-current").get_attribute("data-item")
        if not item or {"text_conflict", "below_threshold"} <= seen:
            break
        stored, group, title, text, top = db.execute(
            "SELECT q.reason, q.tag_group, l.event->>'title',"
            " concat_ws(' ', l.event->>'title', l.event->>'description'), q.candidates->0"
            " FROM review_queue q JOIN listings l USING (listing_id) WHERE q.id = %s",
            (int(item),)).fetchone()
        reason = ReviewReason.model_validate(stored)
        assert page.inner_text("#rv-reason") == reason_sentence(reason, group, title or "")
        if reason.rule == "text_conflict":
            words = [w for found in (*reason.words.values(), *reason.negated.values()) for w in found]
            assert words and all(w.lower() in text.lower() for w in words)
            assert set(reason.words) - {reason.image_value} or reason.negated
        elif reason.rule == "below_threshold":
            assert reason.value == top[0] and reason.probability < reason.threshold
        seen.add(str(reason.rule.value))
        page.click("#rv-current [data-act=skip]")
        page.wait_for_function(f"() => document.querySelector('#rv-current')?.dataset.item !== '{item}'")
    assert {"text_conflict", "below_threshold"} <= seen, seen


def test_quickstart_console_ends_in_a_signed_in_browser(db, pg_url, tmp_path, fmnist_dir):
    """`enrich quickstart --console` as a newcomer runs it: the printed URL and one-time password sign in."""
    data, port = tmp_path / "data", free_port()
    shutil.copytree(save_small_model(tmp_path / "model", "quickstart-test", seed=0),
                    data / "models" / "quickstart-test")
    env = {**os.environ, "ENRICH_DATABASE_URL": pg_url, "ENRICH_CONSOLE_PORT": str(port),
           "ENRICH_CELERY_BROKER_URL": "redis://127.0.0.1:6379/6", "COLUMNS": "200"}
    enrich = str(Path(sys.executable).with_name("enrich"))
    proc = subprocess.Popen([enrich, "quickstart", "--console", "--items", "12", "--data-dir", str(data),
                             "--fmnist-dir", str(fmnist_dir)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "sign in as" in line:
                break
        said = " ".join(lines)
        password = re.search(r"with password (\S+)", said).group(1)
        assert f"http://127.0.0.1:{port}/" in said and "quickstart-admin" in said
        wait_port("127.0.0.1", port, timeout=60)
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        with opener.open(f"http://127.0.0.1:{port}/login") as resp:
            token = resp.read().decode().split('name="csrf" value="', 1)[1].split('"', 1)[0]
        form = urllib.parse.urlencode({"name": "quickstart-admin", "password": password, "csrf": token}).encode()
        with opener.open(urllib.request.Request(f"http://127.0.0.1:{port}/login", data=form)) as resp:
            assert resp.status == 200 and "quickstart-admin · admin" in resp.read().decode()
        assert db.execute("SELECT role FROM console_users WHERE name = 'quickstart-admin'").fetchone()[0] == "admin"
    finally:
        proc.terminate()
        proc.wait(30)
