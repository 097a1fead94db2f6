"""The review queue, driven by the keyboard in Chromium against the served console: corrections land like a
Kafka CorrectionEvent (tag, who/when, item resolved, training label), leases keep reviewers apart, undo
restores what was there, listing text is never markup."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import numpy as np
from PIL import Image
from psycopg.types.json import Jsonb

from enrich.console import review_queue as queue
from enrich.console.users import add_user
from schemas.enrichment import Enrichment, ReviewItem, TagSource, TagValue
from schemas.events import ListingEvent
from schemas.taxonomy import load_taxonomy
from tests.console.conftest import sign_in
from worker.store import listings_to_enrich, upsert_listings, write_enrichments

MODEL = "m-review-1"
CANDIDATES = [("Shirt", 0.41), ("T-shirt/top", 0.33), ("Pullover", 0.12), ("Coat", 0.08)]


# ------------------------------------------------------------------------------------------------ seeding

def add_model(db, version: str = MODEL) -> None:
    """An active model whose manifest carries the taxonomy (what the console lists as every value)."""
    tax = load_taxonomy("fashion-mnist").model_dump(mode="json")
    db.execute("INSERT INTO models (model_version, manifest, path, status, promoted_at)"
               " VALUES (%s, %s, '/nowhere', 'active', now()) ON CONFLICT DO NOTHING",
               (version, Jsonb({"model_version": version, "taxonomy": tax})))


def png(path: Path, colour=(200, 40, 40)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 128), colour).save(path)
    return str(path)


def seed_listings(db, tmp_path: Path, n: int, *, title=lambda i: f"red cotton shirt {i}", review_group="category",
                  candidates=CANDIDATES, prefix="L", images=None, category="Shirt") -> list[str]:
    """n enriched listings through the worker's own store functions: a seller colour, a predicted or
    reviewed category, and one review item each (oldest first)."""
    add_model(db)
    events = [ListingEvent(listing_id=f"{prefix}{i:03d}", seller_id="s1", title=title(i),
                           images=images(i) if images else [png(tmp_path / "img" / f"{prefix}{i}.png",
                                                                (30 * i % 255, 80, 160))],
                           attributes={"colour": "red"}) for i in range(n)]
    with db.transaction():
        upsert_listings(db, events)
    items = listings_to_enrich(db, [e.listing_id for e in events], MODEL)
    rows = []
    for item in items:
        tags = {"colour": TagValue(value="red", source=TagSource.seller)}
        if review_group != "category":
            tags["category"] = TagValue(value=category, source=TagSource.predicted, confidence=0.93,
                                        model_version=MODEL)
        enr = Enrichment(listing_id=item.listing_id, model_version=MODEL, tags=tags,
                         review=[ReviewItem(group=review_group, candidates=candidates, threshold=0.6)])
        rows.append((item, enr, np.ones(4, np.float32)))
    with db.transaction():
        for row in rows:  # one commit order per listing: queue order is listing order
            write_enrichments(db, [row], [])
    return [e.listing_id for e in events]


def current_item(page) -> str:
    return page.get_attribute("#rv-current", "data-item")


def press_and_wait(page, key: str) -> str:
    """Press one key; wait for the item it brings (keyboard only: nothing is clicked)."""
    before = current_item(page)
    page.keyboard.press(key)
    page.wait_for_function("prev => { const c = document.querySelector('#rv-current');"
                           " return c && c.dataset.item !== prev; }", arg=before, timeout=10_000)
    return current_item(page)


def review_row(db, item: str):
    return db.execute("SELECT q.listing_id, q.resolved_at, q.resolved_by, q.leased_by, t.value, t.source"
                      " FROM review_queue q LEFT JOIN listing_tags t ON t.listing_id = q.listing_id"
                      " AND t.tag_group = q.tag_group WHERE q.id = %s", (int(item),)).fetchone()


# -------------------------------------------------------------------------------------------------- tests

def test_a_reviewer_reviews_ten_items_with_the_keyboard_only(browser, console_url, db, tmp_path, screenshots):
    seed_listings(db, tmp_path, 12)
    since = db.execute("SELECT coalesce(max(id), 0) FROM console_actions").fetchone()[0]
    page = sign_in(browser, console_url, "reviewer")
    console_errors = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{console_url}/review")
    first = current_item(page)
    assert page.inner_text("#rv-left").startswith("12")
    page.wait_for_function("() => [...document.querySelectorAll('.rv-photos img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(screenshots / "review.png"), full_page=True)

    # s skips (the item leaves this reviewer's queue), u brings it back
    second = press_and_wait(page, "s")
    assert second != first and review_row(db, first)[3] is None  # lease released
    assert press_and_wait(page, "u") == first

    taken: dict[str, str] = {}
    started = time.perf_counter()
    for i in range(10):
        item = current_item(page)
        key = str(1 + i % 3)
        nxt = press_and_wait(page, key)
        taken[item] = CANDIDATES[int(key) - 1][0]
        assert nxt not in taken
    elapsed = time.perf_counter() - started

    # u undoes the last correction: the item is back, open, and its label is gone
    last = item
    assert press_and_wait(page, "u") == last
    assert review_row(db, last)[1] is None
    assert db.execute("SELECT count(*) FROM corrections").fetchone()[0] == 9
    assert press_and_wait(page, "2") != last  # and is reviewed again, differently
    taken[last] = CANDIDATES[1][0]
    assert page.inner_text("#rv-left").startswith("2")

    for item, value in taken.items():
        lid, resolved_at, resolved_by, leased_by, tag, source = review_row(db, item)
        assert resolved_at is not None and resolved_by == "reviewer" and leased_by is None
        assert (tag, source) == (value, "corrected")
        corr = db.execute("SELECT new_value, corrected_by, corrected_at FROM corrections WHERE listing_id = %s",
                          (lid,)).fetchall()
        assert len(corr) == 1 and corr[0][:2] == (value, "reviewer") and corr[0][2] is not None
    actions = db.execute("SELECT action, count(*) FROM console_actions WHERE user_name = 'reviewer' AND id > %s"
                         " GROUP BY action", (since,)).fetchall()
    assert dict(actions) == {"login": 1, "review.skip": 1, "review.correct": 11, "review.undo": 2}
    assert console_errors == []  # no script or style refused by the CSP, no failed request
    # the figure for the notes (tests print nothing)
    (screenshots / "review_rate.json").write_text(json.dumps(
        {"items": 10, "seconds": round(elapsed, 3), "items_per_minute": round(10 / elapsed * 60, 1)}))


def test_a_reviewer_corrects_through_the_searchable_list_of_every_value(browser, console_url, db, tmp_path,
                                                                       screenshots):
    seed_listings(db, tmp_path, 2)
    page = sign_in(browser, console_url, "reviewer")
    page.goto(f"{console_url}/review")
    item = current_item(page)
    page.keyboard.press("o")  # (not c: that is the "unsure" key)
    page.wait_for_selector("#rv-picker:not([hidden])")
    page.keyboard.type("at")
    assert page.inner_text("#rv-picker-list li.on") == "Coat"
    page.keyboard.press("Escape")  # closes without a change
    assert page.is_hidden("#rv-picker") and current_item(page) == item
    page.keyboard.press("a")  # every taxonomy value is there, not only the candidates
    page.keyboard.type("nkle")
    assert page.inner_text("#rv-picker-list li.on") == "Ankle boot"
    page.screenshot(path=str(screenshots / "review-picker.png"))
    page.keyboard.press("Enter")
    page.wait_for_function("prev => document.querySelector('#rv-current').dataset.item !== prev", arg=item)
    assert review_row(db, item)[4:] == ("Ankle boot", "corrected")
    assert "Saved category = Ankle boot" in page.inner_text("#rv-flash")


def test_keys_pressed_faster_than_the_server_answers_run_in_order(browser, console_url, db, tmp_path):
    lids = seed_listings(db, tmp_path, 5)
    page = sign_in(browser, console_url, "reviewer")
    page.goto(f"{console_url}/review")
    for key in "123s":  # no waiting in between: the page queues them
        page.keyboard.press(key)
    page.wait_for_function("() => document.querySelector('#rv-left').dataset.left === '1'")
    assert page.get_attribute("#rv-current", "data-listing") == lids[4]
    got = db.execute("SELECT q.listing_id, t.value FROM review_queue q JOIN listing_tags t ON t.listing_id ="
                     " q.listing_id AND t.tag_group = 'category' WHERE q.resolved_by = 'reviewer' ORDER BY 1"
                     ).fetchall()
    assert got == [(lids[0], "Shirt"), (lids[1], "T-shirt/top"), (lids[2], "Pullover")]
    assert db.execute("SELECT resolved_at, leased_by FROM review_queue WHERE listing_id = %s",
                      (lids[3],)).fetchone() == (None, None)  # skipped: open, lease given back


def test_filters_by_group_predicted_category_and_model_version(browser, console_url, db, tmp_path):
    seed_listings(db, tmp_path, 3)  # category items, top candidate Shirt
    colour = seed_listings(db, tmp_path, 2, prefix="C", review_group="colour", category="Dress",
                           candidates=[("blue", 0.4), ("purple", 0.3)])
    db.execute("UPDATE review_queue SET model_version = 'm-review-2' WHERE listing_id = 'L001'")
    page = sign_in(browser, console_url, "reviewer")
    page.goto(f"{console_url}/review")
    assert page.inner_text("#rv-left").startswith("5")
    page.select_option("select[name=group]", "colour")
    page.click("button:text('Filter')")
    page.wait_for_url("**/review?group=colour**")
    assert page.get_attribute("#rv-current", "data-group") == "colour"
    assert page.inner_text("#rv-left").startswith("2")

    def shown(query: str) -> tuple[str | None, str]:
        page.goto(f"{console_url}/review?{query}")
        return page.get_attribute("#rv-current", "data-listing"), page.inner_text("#rv-left").split()[0]

    assert shown("category=Dress") == ("C000", "2")  # the listing's (predicted) category
    assert shown("category=Shirt") == ("L000", "3")  # a category item's top candidate
    assert shown("model=m-review-2") == ("L001", "1")
    assert shown("group=category&model=m-review-1") == ("L000", "2")
    page.goto(f"{console_url}/review?group=colour")
    press_and_wait(page, "1")
    press_and_wait(page, "1")
    assert "Nothing left to review" in page.inner_text("#rv-current")
    resolved = [r[0] for r in db.execute("SELECT listing_id FROM review_queue WHERE resolved_at IS NOT NULL"
                                         " ORDER BY 1").fetchall()]
    assert resolved == colour


def test_two_browser_contexts_reviewing_at_once_never_get_the_same_item(browser, console_url, db, tmp_path):
    seed_listings(db, tmp_path, 10)
    a = sign_in(browser, console_url, "reviewer")
    b = sign_in(browser, console_url, "admin")
    a.goto(f"{console_url}/review")
    b.goto(f"{console_url}/review")
    seen = {"reviewer": [current_item(a)], "admin": [current_item(b)]}
    assert seen["reviewer"][0] != seen["admin"][0]
    for _ in range(4):
        for name, page, other in (("reviewer", a, b), ("admin", b, a)):
            nxt = press_and_wait(page, "1")
            if nxt:
                assert nxt != current_item(other)
                seen[name].append(nxt)
    b.reload()  # a reload shows the item the reviewer holds, not another one
    assert current_item(b) == seen["admin"][-1]
    assert not set(seen["reviewer"]) & set(seen["admin"])
    assert db.execute("SELECT count(*) FROM review_queue WHERE resolved_at IS NOT NULL").fetchone()[0] == 8
    by = dict(db.execute("SELECT resolved_by, count(*) FROM review_queue WHERE resolved_at IS NOT NULL"
                         " GROUP BY 1").fetchall())
    assert by == {"reviewer": 4, "admin": 4}


def test_concurrent_pickers_lease_distinct_items_and_a_stolen_item_is_not_resolved(console_url, db, tmp_path):
    seed_listings(db, tmp_path, 10)
    names = [f"rev{i}" for i in range(6)]
    for name in names:
        add_user(db, name, "password-" + name, "reviewer")
    sessions = [_http_login(console_url, name, "password-" + name) for name in names]
    got: dict[str, str] = {}
    barrier = threading.Barrier(len(sessions))

    def pick(name, opener):
        barrier.wait()
        with opener.open(f"{console_url}/review/item") as resp:
            got[name] = resp.read().decode().split('data-item="', 1)[1].split('"', 1)[0]

    threads = [threading.Thread(target=pick, args=(n, s[0])) for n, s in zip(names, sessions, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 6 and len(set(got.values())) == 6
    held = dict(db.execute("SELECT leased_by, id::text FROM review_queue WHERE leased_by IS NOT NULL").fetchall())
    assert held == got
    # rev0's lease runs out and rev1 gets the item: rev0 can no longer resolve it
    db.execute("UPDATE review_queue SET leased_by = 'rev1', lease_until = now() + interval '5 minutes'"
               " WHERE id = %s", (int(got["rev0"]),))
    opener, token = sessions[0]
    html = _http_post(opener, f"{console_url}/review/{got['rev0']}/take", {"value": "Shirt"}, token)
    assert "another reviewer has it now" in html
    assert review_row(db, got["rev0"])[1] is None


def test_undo_restores_the_tag_row_as_it_was_and_drops_the_training_label(db, tmp_path):
    seed_listings(db, tmp_path, 1, review_group="colour", candidates=[("blue", 0.4), ("navy", 0.35)])
    # a predicted tag that is also queued (e.g. a group the model filled while another version queued it)
    db.execute("INSERT INTO listing_tags VALUES ('L000', 'colour', 'blue', 'predicted', 0.42, %s,"
               " '2024-05-01T10:00:00Z') ON CONFLICT (listing_id, tag_group) DO UPDATE SET value = EXCLUDED.value,"
               " source = EXCLUDED.source, confidence = EXCLUDED.confidence,"
               " model_version = EXCLUDED.model_version, updated_at = EXCLUDED.updated_at", (MODEL,))
    before = db.execute("SELECT * FROM listing_tags WHERE listing_id = 'L000' AND tag_group = 'colour'").fetchone()
    item = queue.next_item(db, "ann", queue.Filters(), [], 300)
    action, ev = queue.correct_item(db, "ann", item, "navy")
    assert ev.old_value == "blue" and ev.corrected_by == "ann"
    assert db.execute("SELECT count(*) FROM corrections").fetchone()[0] == 1
    done = queue.undo(db, "ann", action, 300)
    assert (done.kind, done.item, done.show) == ("correct", item, item)
    assert db.execute("SELECT * FROM listing_tags WHERE listing_id = 'L000' AND tag_group = 'colour'"
                      ).fetchone() == before
    assert db.execute("SELECT count(*) FROM corrections").fetchone()[0] == 0
    assert db.execute("SELECT resolved_at, resolved_by, leased_by FROM review_queue WHERE id = %s",
                      (item,)).fetchone() == (None, None, "ann")
    # a second undo of the same action is refused, and so is one after a later correction
    try:
        queue.undo(db, "ann", action, 300)
        raise AssertionError("undone twice")
    except queue.Conflict:
        pass
    action, _ = queue.correct_item(db, "ann", item, "navy")
    queue.correct_listing(db, "bob", "L000", "colour", "black")
    try:
        queue.undo(db, "ann", action, 300)
        raise AssertionError("undid over a later correction")
    except queue.Conflict as exc:
        assert "changed since" in str(exc)


def test_a_listing_title_with_a_script_tag_renders_as_text(browser, console_url, db, tmp_path):
    evil = "<script>alert(1)</script>"
    lids = seed_listings(db, tmp_path, 1, title=lambda i: evil)
    page = sign_in(browser, console_url, "reviewer")
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{console_url}/review")
    assert page.inner_text("#rv-title") == evil
    page.goto(f"{console_url}/listings/{lids[0]}")
    assert page.inner_text("#ls-title") == evil
    page.goto(f"{console_url}/listings?q=script")
    assert evil in page.inner_text("table.ls-results")
    page.wait_for_timeout(200)
    assert dialogs == []


# ------------------------------------------------------------------------------------------------ helpers

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _http_login(base: str, name: str, password: str):
    """A signed-in cookie session over plain HTTP, and its CSRF token."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()), _NoRedirect())
    with opener.open(f"{base}/login") as resp:
        token = resp.read().decode().split('name="csrf" value="', 1)[1].split('"', 1)[0]
    data = urllib.parse.urlencode({"name": name, "password": password, "csrf": token}).encode()
    try:
        opener.open(urllib.request.Request(f"{base}/login", data=data))
        raise AssertionError("no redirect after the login")
    except urllib.error.HTTPError as exc:
        assert exc.code == 303
    with opener.open(f"{base}/listings?q=-") as resp:  # any page carries the new session's token
        html = resp.read().decode()
    return opener, html.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]


def _http_post(opener, url: str, data: dict, token: str) -> str:
    req = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode(), headers={"X-CSRF-Token": token})
    with opener.open(req) as resp:
        return resp.read().decode()

