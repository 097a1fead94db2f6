"""Listing pages and search, and the thumbnail route, against the served console in Chromium."""
from __future__ import annotations

import hashlib
import http.server
import io
import threading
from datetime import UTC, datetime
from urllib.parse import quote

from PIL import Image

from schemas.events import CorrectionEvent
from tests.console.conftest import sign_in
from tests.console.test_review import MODEL, seed_listings
from worker.store import record_correction


def test_the_listing_page_shows_provenance_and_history_and_corrects_a_tag_that_was_never_queued(
        browser, console_url, db, tmp_path, screenshots):
    seed_listings(db, tmp_path, 3, review_group="colour", candidates=[("blue", 0.4), ("purple", 0.3)])
    record_correction(db, CorrectionEvent(event_id="kafka-7", listing_id="L000", group="fabric", old_value=None,
                                          new_value="denim", corrected_by="ops-bot",
                                          corrected_at=datetime(2024, 5, 1, 9, 30, tzinfo=UTC)))
    db.execute("INSERT INTO similar_items_online (model_version, listing_id, neighbour_ids, scores)"
               " VALUES (%s, 'L000', ARRAY['L001', 'L002'], ARRAY[0.91, 0.84]::real[])", (MODEL,))
    since = db.execute("SELECT coalesce(max(id), 0) FROM console_actions").fetchone()[0]
    page = sign_in(browser, console_url, "admin")
    page.goto(f"{console_url}/listings/L000")

    category = page.locator("tr[data-group=category]")
    assert category.locator("td").nth(1).inner_text() == "Shirt"
    assert category.locator("td").nth(2).inner_text() == "predicted"
    assert category.locator("td").nth(3).inner_text() == "0.93"
    assert category.locator("td").nth(4).inner_text() == MODEL
    assert page.locator("tr[data-group=colour] td").nth(2).inner_text() == "seller"
    assert page.locator("tr[data-group=fabric] td").nth(2).inner_text() == "corrected"
    history = page.inner_text("#history")
    assert "denim" in history and "ops-bot" in history and "corrections topic" in history
    shelf = page.locator(".ls-shelf-item")
    assert shelf.count() == 2 and shelf.first.get_attribute("href") == "/listings/L001"
    page.wait_for_function("() => [...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(screenshots / "listing.png"), full_page=True)

    # a value outside the taxonomy is refused and changes nothing
    category.locator("input[name=value]").fill("Spaceship")
    category.locator("button").click()
    page.wait_for_selector("#ls-error")
    assert db.execute("SELECT count(*) FROM corrections").fetchone()[0] == 1

    # the category was never queued: it is corrected all the same, through the corrections path
    page.locator("tr[data-group=category] input[name=value]").fill("Coat")
    page.locator("tr[data-group=category] button").click()
    page.wait_for_selector("#ls-done")
    row = page.locator("tr[data-group=category] td")
    assert row.nth(1).inner_text() == "Coat" and row.nth(2).inner_text() == "corrected"
    assert row.nth(3).inner_text() == "—"
    corr = db.execute("SELECT event_id, old_value, new_value, corrected_by FROM corrections"
                      " WHERE tag_group = 'category'").fetchone()
    assert corr[0].startswith("console:") and corr[1:] == ("Shirt", "Coat", "admin")
    assert db.execute("SELECT value, source, confidence, model_version FROM listing_tags WHERE listing_id = 'L000'"
                      " AND tag_group = 'category'").fetchone() == ("Coat", "corrected", None, None)
    assert "Coat" in page.inner_text("#history") and "console" in page.inner_text("#history")
    # the listing's queued colour item is untouched; correcting the colour from here resolves it
    assert db.execute("SELECT resolved_at FROM review_queue WHERE listing_id = 'L000'").fetchone()[0] is None
    page.locator("tr[data-group=colour] input[name=value]").fill("green")
    page.locator("tr[data-group=colour] button").click()
    page.wait_for_function("() => document.querySelector('tr[data-group=colour] .ls-value')?.textContent === 'green'")
    assert db.execute("SELECT resolved_by FROM review_queue WHERE listing_id = 'L000'").fetchone()[0] == "admin"
    assert db.execute("SELECT user_name, count(*) FROM console_actions WHERE action = 'listing.correct' AND id > %s"
                      " GROUP BY 1", (since,)).fetchall() == [("admin", 2)]


def test_listing_search_finds_by_id_or_title_and_filters_by_status(browser, console_url, db, tmp_path):
    seed_listings(db, tmp_path, 3, title=lambda i: ["Blue denim jacket", "Red 100% wool coat", "jacket_2"][i])
    db.execute("UPDATE listings SET status = 'failed' WHERE listing_id = 'L002'")
    page = sign_in(browser, console_url, "reviewer")

    def found(query: str) -> list[str]:
        page.goto(f"{console_url}/listings?{query}")
        return page.locator("table.ls-results td:nth-child(2) a").all_inner_texts()

    assert found("q=L001") == ["L001"]
    assert sorted(found("q=JACKET")) == ["L000", "L002"]
    assert found("q=100%25") == ["L001"]  # LIKE wildcards are text
    assert found("q=jacket&status=failed") == ["L002"]
    assert sorted(found("")) == ["L000", "L001", "L002"]
    page.goto(f"{console_url}/listings?q=wool")
    page.click("text=L001")
    page.wait_for_url(f"{console_url}/listings/L001")


class _Counting(http.server.BaseHTTPRequestHandler):
    hits: list[str]  # set per test

    def do_GET(self):
        type(self).hits.append(self.path)
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (0, 0, 0)).save(buf, "PNG")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(buf.getvalue())

    def log_message(self, *args):
        pass


def test_thumbnails_refuse_unknown_listings_and_indexes_and_never_fetch_a_url_from_the_request(
        browser, console_url, console_settings, db, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{server.server_address[1]}"
    _Counting.hits = []
    try:
        local = str(tmp_path / "img" / "A.png")
        seed_listings(db, tmp_path, 1, prefix="A")
        seed_listings(db, tmp_path, 1, prefix="B", images=lambda i: [f"{remote}/b.png"])
        page = sign_in(browser, console_url, "reviewer")
        get = page.request.get

        ok = get(f"{console_url}/img/A000/0")
        assert ok.status == 200 and ok.headers["content-type"] == "image/jpeg"
        assert "x-thumbnail" not in ok.headers
        assert Image.open(io.BytesIO(ok.body())).format == "JPEG"
        local = db.execute("SELECT event->'images'->>0 FROM listings WHERE listing_id = 'A000'").fetchone()[0]
        cached = console_settings.data_dir / "console-thumbs" / f"{hashlib.sha256(local.encode()).hexdigest()}.jpg"
        assert cached.read_bytes() == ok.body()

        for path in ("/img/A000/1", "/img/A000/12", "/img/A000/-1", "/img/NOPE/0",
                     f"/img/{quote(remote + '/x.png', safe='')}/0"):
            assert get(console_url + path).status == 404, path
        # a URL in the query is ignored: the listing's own image comes back
        same = get(f"{console_url}/img/A000/0?url={quote(remote + '/evil.png')}&uri={quote(remote)}")
        assert same.status == 200 and same.body() == ok.body()
        # a listing whose stored image is on a host that is not allowed gets the placeholder, unfetched
        b = get(f"{console_url}/img/B000/0")
        assert b.status == 200 and b.headers["x-thumbnail"] == "placeholder"
        assert _Counting.hits == []
        # and nobody signed out gets an image
        anon = browser.new_context().request.get(f"{console_url}/img/A000/0", max_redirects=0)
        assert anon.status in (303, 401) and not anon.headers["content-type"].startswith("image/")
    finally:
        server.shutdown()
