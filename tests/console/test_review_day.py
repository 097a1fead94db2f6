"""The reviewer's day on /review, in Chromium against the served console: a counter of what is yours
to take and your hold's countdown, seller text isolated in <bdi>, a clean "signed out" instead of raw HTML,
"unsure" comments that go to an admin, photo zoom, your recent decisions and progress, the labelling
guidelines of the item's group, and a card that fits a 390 px wide phone."""
from __future__ import annotations

import re
from urllib.parse import quote

import pytest

from enrich.console import guidelines
from enrich.console.review_queue import correct_listing
from schemas.taxonomy import load_taxonomy
from tests.console.conftest import sign_in
from tests.console.test_review import current_item, press_and_wait, review_row, seed_listings


def hold_seconds(page) -> int:
    m = re.fullmatch(r"your hold on this item: (\d+):(\d\d)", page.inner_text("#rv-lease"))
    assert m, page.inner_text("#rv-lease")
    return int(m.group(1)) * 60 + int(m.group(2))


def test_the_counter_shows_what_is_yours_to_take_and_your_hold_counts_down(browser, console_url, db, tmp_path,
                                                                         console_settings):
    lids = seed_listings(db, tmp_path, 6)
    # two items held by another reviewer's live lease, one whose lease ran out (free again)
    db.execute("UPDATE review_queue SET leased_by = 'other', lease_until = now() + interval '5 minutes'"
               " WHERE listing_id = ANY(%s)", (lids[:2],))
    db.execute("UPDATE review_queue SET leased_by = 'other', lease_until = now() - interval '1 minute'"
               " WHERE listing_id = %s", (lids[2],))
    page = sign_in(browser, console_url, "reviewer")
    page.goto(f"{console_url}/review")
    assert page.get_attribute("#rv-current", "data-listing") == lids[2]
    assert page.get_attribute("#rv-left", "data-left") == "4"
    assert page.inner_text("#rv-left") == "4 yours to take"
    assert page.inner_text("#rv-held") == "2 held by other reviewers"

    lease_s = int(console_settings.console_lease_s)
    first = hold_seconds(page)
    assert lease_s - 2 <= first <= lease_s
    page.wait_for_function("s => document.querySelector('#rv-lease .num').textContent !== s",
                           arg=page.inner_text("#rv-lease .num"))
    assert hold_seconds(page) < first

    press_and_wait(page, "s")  # skipped by me: no longer mine to take
    assert page.get_attribute("#rv-left", "data-left") == "3"
    for left in ("2", "1"):
        press_and_wait(page, "1")
        assert page.get_attribute("#rv-left", "data-left") == left
    press_and_wait(page, "1")
    # the counter agrees with the card: nothing is left for me, although two items are still open
    assert "Nothing left to review" in page.inner_text("#rv-current")
    assert page.get_attribute("#rv-left", "data-left") == "0"
    assert page.query_selector("#rv-lease") is None
    assert db.execute("SELECT count(*) FROM review_queue WHERE resolved_at IS NULL").fetchone()[0] == 3


def test_seller_text_with_direction_overrides_is_isolated(browser, console_url, db, tmp_path):
    rlo = "\u202e"  # right-to-left override, never closed
    seed_listings(db, tmp_path, 1, title=lambda i: f"{rlo}txet dedirrevo", review_group="colour",
                  candidates=[("blue", 0.4), ("purple", 0.3)])
    db.execute("UPDATE listing_tags SET value = %s WHERE listing_id = 'L000' AND tag_group = 'colour'",
               (f"red {rlo}evil",))
    page = sign_in(browser, console_url, "reviewer")
    page.goto(f"{console_url}/review")
    assert page.inner_text("#rv-title bdi") == f"{rlo}txet dedirrevo"
    assert page.inner_text(".tag.seller bdi:last-child") == f"red {rlo}evil"
    # a comment with an override, in the list of my decisions with text after it: that text is not turned round
    item = current_item(page)
    page.keyboard.press("c")
    page.wait_for_selector("#rv-comment:not([hidden])")
    page.keyboard.type(f"odd {rlo}title")
    page.keyboard.press("Enter")
    page.wait_for_function("prev => document.querySelector('#rv-current').dataset.item !== prev", arg=item)
    assert press_and_wait(page, "u") == item
    order = page.evaluate("""() => {
        const li = document.querySelector('#rv-recent li');
        const node = [...li.querySelectorAll('span')].pop().firstChild;  // "(undone)"
        const x = i => { const r = document.createRange(); r.setStart(node, i); r.setEnd(node, i + 1);
                         return r.getBoundingClientRect().left; };
        return [node.textContent, x(1), x(6)];
    }""")
    assert order[0] == "(undone)" and order[1] < order[2], order  # "u" is drawn left of "e"


@pytest.mark.parametrize("how", ["cookies cleared", "account disabled", "redirected to the sign-in page"])
def test_losing_the_session_shows_a_sign_in_link_never_html(browser, console_url, db, tmp_path, how):
    seed_listings(db, tmp_path, 3)
    page = sign_in(browser, console_url, "reviewer")
    page.goto(f"{console_url}/review?group=category")
    item = current_item(page)
    if how == "cookies cleared":
        page.context.clear_cookies()
    elif how == "account disabled":
        db.execute("UPDATE console_users SET disabled = true WHERE name = 'reviewer'")
    else:  # what a console that answers a lost session with a redirect does: fetch follows it
        page.route(re.compile(r"/review/\d+/take"), lambda route: route.fulfill(
            status=303, headers={"Location": "/login?next=%2Freview"}, body=""))
    page.keyboard.press("1")
    link = page.wait_for_selector("#rv-flash a")
    assert link.inner_text() == "Signed out — sign in again"
    assert link.get_attribute("href") == "/login?next=" + quote("/review?group=category", safe="")
    html = page.inner_html("#review-item")
    assert "<form" not in html and "doctype" not in html.lower() and "password" not in html
    assert current_item(page) == item  # the card stays as it was
    assert review_row(db, item)[1] is None  # nothing was saved
    page.keyboard.press("2")  # later keys say the same and still send nothing that could be saved
    page.wait_for_timeout(300)
    assert page.inner_text("#rv-flash") == "Signed out — sign in again"


def test_unsure_sends_the_item_to_an_admin_with_a_comment(browser, console_url, db, tmp_path):
    lids = seed_listings(db, tmp_path, 3)
    page = sign_in(browser, console_url, "reviewer")
    page.goto(f"{console_url}/review")
    unsure = current_item(page)
    page.keyboard.press("c")
    page.wait_for_selector("#rv-comment:not([hidden])")
    page.keyboard.type("Shirt or blouse? <b>no collar</b>")
    page.keyboard.press("Enter")
    page.wait_for_function("prev => document.querySelector('#rv-current').dataset.item !== prev", arg=unsure)
    assert "Sent to an admin" in page.inner_text("#rv-flash")
    assert page.get_attribute("#rv-left", "data-left") == "2"
    assert db.execute("SELECT flagged_by, flag_note, flagged_at IS NOT NULL, leased_by, resolved_at FROM review_queue"
                      " WHERE id = %s", (int(unsure),)).fetchone() == (
        "reviewer", "Shirt or blouse? <b>no collar</b>", True, None, None)

    assert press_and_wait(page, "u") == unsure  # undo: back with me, no longer flagged
    assert db.execute("SELECT flagged_at, leased_by FROM review_queue WHERE id = %s",
                      (int(unsure),)).fetchone() == (None, "reviewer")
    page.keyboard.press("c")
    page.wait_for_selector("#rv-comment:not([hidden])")
    page.keyboard.type("Shirt or blouse? <b>no collar</b>")
    page.keyboard.press("Enter")
    page.wait_for_function("prev => document.querySelector('#rv-current').dataset.item !== prev", arg=unsure)
    press_and_wait(page, "1")
    press_and_wait(page, "1")
    assert "Nothing left to review" in page.inner_text("#rv-current")  # never shown to reviewers again
    page.goto(f"{console_url}/review?flagged=1")  # a reviewer cannot ask for the admins' list
    assert "Nothing left to review" in page.inner_text("#rv-current")
    actions = [r[0] for r in db.execute("SELECT action FROM console_actions WHERE user_name = 'reviewer'"
                                        " AND action LIKE 'review.%%' ORDER BY id").fetchall()]
    assert actions == ["review.flag", "review.undo", "review.flag", "review.correct", "review.correct"]

    admin = sign_in(browser, console_url, "admin")
    admin.goto(f"{console_url}/review")
    assert "Nothing left to review" in admin.inner_text("#rv-current")
    admin.click("#rv-flagged")
    admin.wait_for_url("**/review?flagged=1")
    assert current_item(admin) == unsure
    assert admin.inner_text("#rv-flag bdi") == "Shirt or blouse? <b>no collar</b>"  # text, not markup
    assert "Sent to an admin by reviewer" in admin.inner_text("#rv-flag")
    press_and_wait(admin, "2")
    row = review_row(db, unsure)
    assert row[2] == "admin" and row[4:] == ("T-shirt/top", "corrected")
    assert sorted(r[0] for r in db.execute("SELECT listing_id FROM review_queue WHERE resolved_at IS NOT NULL")
                  ) == lids


def test_a_photo_opens_large_and_esc_closes_it(browser, console_url, db, tmp_path, screenshots):
    seed_listings(db, tmp_path, 2)
    page = sign_in(browser, console_url, "reviewer")
    page.goto(f"{console_url}/review")
    page.wait_for_function("() => [...document.querySelectorAll('.rv-photos img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    assert page.is_hidden("#rv-zoom")
    page.click(".rv-photos img")
    page.wait_for_selector("#rv-zoom:not([hidden])")
    page.wait_for_function("() => document.querySelector('#rv-zoom-img').naturalWidth > 0")
    assert page.get_attribute("#rv-zoom-img", "src") == page.get_attribute(".rv-photos img", "src")
    box = page.locator("#rv-zoom-img").bounding_box()
    assert box["width"] > 2 * 240 and box["height"] > 2 * 240  # large, not the card's 240 px
    page.keyboard.press("Escape")
    page.wait_for_selector("#rv-zoom", state="hidden")
    item = current_item(page)
    page.keyboard.press("z")
    page.wait_for_selector("#rv-zoom:not([hidden])")
    page.wait_for_function("() => document.querySelector('#rv-zoom-img').naturalWidth > 0")
    page.screenshot(path=str(screenshots / "review_zoom.png"))
    page.keyboard.press("Escape")
    page.wait_for_selector("#rv-zoom", state="hidden")
    assert current_item(page) == item  # looking changed nothing


def test_my_recent_decisions_and_todays_progress_beside_the_card(browser, console_url, db, tmp_path):
    lids = seed_listings(db, tmp_path, 6)
    page = sign_in(browser, console_url, "reviewer")
    page.goto(f"{console_url}/review")
    assert page.inner_text("#rv-progress") == "You resolved 0 of the 0 items resolved today."
    assert "None yet" in page.inner_text("#rv-side")
    press_and_wait(page, "1")  # L000 → Shirt
    press_and_wait(page, "s")  # L001 skipped
    press_and_wait(page, "3")  # L002 → Pullover
    press_and_wait(page, "2")  # L003 → T-shirt/top, then undone
    press_and_wait(page, "u")
    # someone else resolves one on the listing page
    correct_listing(db, "admin", lids[5], "category", "Coat")
    press_and_wait(page, "1")  # L003 again → Shirt
    rows = page.locator("#rv-recent li").all_inner_texts()
    assert [re.sub(r"^\d\d:\d\d\s+", "", r) for r in rows] == [
        f"{lids[3]} · category → Shirt",
        f"{lids[3]} · category → T-shirt/top (undone)",
        f"{lids[2]} · category → Pullover",
        f"{lids[1]} · category skipped",
        f"{lids[0]} · category → Shirt",
    ]
    assert page.locator("#rv-recent li a").first.get_attribute("href") == f"/listings/{lids[3]}"
    assert page.inner_text("#rv-progress") == "You resolved 3 of the 4 items resolved today."
    side, card = page.locator("#rv-side").bounding_box(), page.locator("#rv-current").bounding_box()
    assert side["x"] >= card["x"] + card["width"]  # beside the card


def test_the_guidelines_of_the_items_group_are_shown_in_the_card(browser, console_url, db, tmp_path):
    seed_listings(db, tmp_path, 1, review_group="colour", candidates=[("blue", 0.4), ("purple", 0.3)])
    page = sign_in(browser, console_url, "reviewer")
    page.goto(f"{console_url}/review")
    assert page.inner_text("#rv-guide summary") == "How to label colour"
    assert page.inner_text("#rv-guide strong") == "dominant colour"  # the markdown, rendered
    assert "Label the main item" not in page.inner_text("#rv-guide")  # the category section is not


def test_guideline_files_cover_every_group_and_never_pass_html_through():
    for name in ("deepfashion", "fashion-mnist"):
        sections = guidelines.guidelines(name)
        assert set(sections) == set(load_taxonomy(name).all_groups), name
        assert all("<li>" in html for html in sections.values())
        assert guidelines.guidelines(name) is sections  # parsed once per process
    parsed = guidelines.parse_guidelines("# title\n\n## colour\n\n<script>alert(1)</script>\n\n"
                                         "*red* <img src=x onerror=alert(1)> [x](javascript:alert(1))\n## fit\n- tight")
    assert "<script" not in parsed["colour"] and "&lt;script&gt;" in parsed["colour"]
    assert "<img" not in parsed["colour"] and 'href="javascript' not in parsed["colour"]
    assert "<em>red</em>" in parsed["colour"] and parsed["fit"] == "<ul>\n<li>tight</li>\n</ul>\n"
    assert guidelines.guidelines("../etc/passwd") == {} and guidelines.guidelines("no-such-taxonomy") == {}


def test_the_card_fits_a_390_px_wide_phone(browser, console_url, db, tmp_path):
    seed_listings(db, tmp_path, 2, title=lambda i: "an extraordinarily long listing title " * 3,
                  candidates=[("Ankle boot", 0.41), ("T-shirt/top", 0.33), ("Pullover", 0.12), ("Sneaker", 0.08)])
    page = sign_in(browser, console_url, "reviewer")
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{console_url}/review")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    right = page.evaluate("() => Math.max(...[...document.querySelectorAll("
                          "'#review-item *, .rv-filters *')].map(e => e.getBoundingClientRect().right))")
    assert right <= 390
    card = page.locator("#rv-current").bounding_box()
    for cand in page.locator(".rv-cand").all():
        b = cand.bounding_box()
        assert b["x"] >= card["x"] and b["x"] + b["width"] <= card["x"] + card["width"]
    press_and_wait(page, "1")  # and it still works there
