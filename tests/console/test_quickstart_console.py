"""The newcomer's first look: the quickstart's catalogue in the console shows its real photos (review card,
listing page, similar-items shelf) although the console runs with local paths off: the photos are the
installation's own files under the data directory."""
from __future__ import annotations

import io
import shutil

import pytest
from PIL import Image, ImageStat

from tests.console.conftest import sign_in


@pytest.fixture()
def quickstart_data(db, pg_url, tmp_path, fmnist_dir):
    """The quickstart run on the test database (its model: a small one, saved where the quickstart reuses it)."""
    from rich.console import Console

    from core.config import Settings
    from enrich.quickstart import run_quickstart
    from tests.worker.conftest import save_small_model

    data = tmp_path / "data"
    model = save_small_model(tmp_path / "model", "quickstart-test", seed=0, colour_threshold=0.9)  # colour → review
    shutil.copytree(model, data / "models" / "quickstart-test")
    out = run_quickstart(Settings(data_dir=data, database_url=pg_url), fmnist_dir, items=24, examples=1,
                         console=Console(file=io.StringIO()))
    assert out["enriched"] == 24
    return data


@pytest.fixture()
def console_settings(pg_url, quickstart_data):
    from core.config import Settings

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
