"""The console serves review items in ENRICH_REVIEW_ORDER: "gain" the highest stored priority first (ranked by
`reprioritise`), "fifo" the oldest; the review page says which, and so does `enrich models`."""
from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar

import pytest
from typer.testing import CliRunner

from enrich.cli import app
from enrich.console.review_queue import Filters, next_item
from tests.console.conftest import PASSWORDS
from tests.worker.test_review_order import seed_cluster_and_loner
from worker.review_priority import reprioritise


def _ranked_queue(db) -> tuple[int, int]:
    """Seed and rank the queue: (the highest-priority item, the oldest item) — two different items."""
    ids = seed_cluster_and_loner(db)
    reprioritise(db)
    best = db.execute("SELECT id FROM review_queue ORDER BY priority DESC LIMIT 1").fetchone()[0]
    oldest = ids["loner"]
    assert best != oldest
    return best, oldest


def test_next_item_serves_the_most_useful_item_under_gain_and_the_oldest_under_fifo(db):
    best, oldest = _ranked_queue(db)
    assert next_item(db, "ann", Filters(), [], 300, order="gain") == best
    assert next_item(db, "bob", Filters(), [], 300, order="fifo") == oldest
    # ann's lease holds her item; the next gain pick for someone else is the next priority down, not the oldest
    second = db.execute("SELECT id FROM review_queue WHERE id <> %s ORDER BY priority DESC LIMIT 1",
                        (best,)).fetchone()[0]
    assert next_item(db, "cy", Filters(), [], 300, order="gain") == second != oldest


def test_unranked_items_come_after_ranked_ones_oldest_first(db):
    best, oldest = _ranked_queue(db)
    db.execute("UPDATE review_queue SET priority = NULL WHERE id <> %s", (best,))
    assert next_item(db, "ann", Filters(), [], 300, order="gain") == best
    assert next_item(db, "bob", Filters(), [], 300, order="gain") == oldest


@pytest.fixture(params=["gain", "fifo"])
def console_settings(request, console_settings):
    return console_settings.model_copy(update={"review_order": request.param})


def _login(base: str, name: str):
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    with opener.open(f"{base}/login") as resp:
        token = resp.read().decode().split('name="csrf" value="', 1)[1].split('"', 1)[0]
    data = urllib.parse.urlencode({"name": name, "password": PASSWORDS[name], "csrf": token}).encode()
    opener.open(urllib.request.Request(f"{base}/login", data=data)).close()
    return opener


def test_the_review_page_says_the_order_and_serves_by_it(console_settings, console_url, db):
    best, oldest = _ranked_queue(db)
    with _login(console_url, "reviewer").open(f"{console_url}/review") as resp:
        html = resp.read().decode()
    line = html.split('id="rv-order">', 1)[1].split("<", 1)[0]
    served = int(html.split('id="rv-current"', 1)[1].split('data-item="', 1)[1].split('"', 1)[0])
    if console_settings.review_order == "gain":
        assert (line, served) == ("Order: most useful first", best)
    else:
        assert (line, served) == ("Order: oldest first", oldest)


def test_enrich_models_prints_the_review_order(pg_url, db):
    for order in ("gain", "fifo"):
        res = CliRunner().invoke(app, ["models", "--database-url", pg_url],
                                 env={"COLUMNS": "200", "ENRICH_REVIEW_ORDER": order})
        assert res.exit_code == 0, res.output
        assert f"review order: {order}\n" in res.output
