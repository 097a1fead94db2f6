"""Listing ids a browser cannot put in a path (`..` and `.`: /listings/.. is resolved to /) open through
/listing?id=, in Chromium against the served console: from the search, from another listing's shelf, with
their photos and heat maps; a correction on such a listing saves and comes back to it. The listings pages fit
390 px."""
from __future__ import annotations

import numpy as np
from PIL import Image

from model.explain import overlay_png
from schemas.enrichment import Enrichment, ReviewItem, TagSource, TagValue
from schemas.events import ListingEvent
from tests.console.conftest import sign_in
from tests.console.test_review import MODEL, add_model, png
from worker.explanations import explanations_root, record_explanations
from worker.store import listings_to_enrich, upsert_listings, write_enrichments

IDS = {"..": "dot-dot jacket", ".": "single dot shirt", "L1": "plain coat"}


def _seed(db, tmp_path) -> None:
    """The three listings, enriched (a predicted category) with a colour review item each."""
    add_model(db)
    events = [ListingEvent(listing_id=lid, seller_id="s1", title=title,
                           images=[png(tmp_path / "img" / f"{n}.png", (40 * n, 90, 160))])
              for n, (lid, title) in enumerate(IDS.items())]
    with db.transaction():
        upsert_listings(db, events)
    for item in listings_to_enrich(db, list(IDS), MODEL):
        enr = Enrichment(listing_id=item.listing_id, model_version=MODEL,
                         tags={"category": TagValue(value="Shirt", source=TagSource.predicted, confidence=0.9,
                                                    model_version=MODEL)},
                         review=[ReviewItem(group="colour", candidates=[("blue", 0.4), ("red", 0.3)], threshold=0.6)])
        with db.transaction():
            write_enrichments(db, [(item, enr, np.ones(4, np.float32))], [])


def _images_loaded(page) -> bool:
    """Every image of the page shows (the lazy ones scrolled to first); a broken one never does."""
    for img in page.locator("main img").all():
        img.scroll_into_view_if_needed()
        img.evaluate("i => new Promise(done => { if (i.complete) { done(); } else { i.onload = i.onerror = done; } })")
    return page.evaluate("() => [...document.querySelectorAll('main img')]"
                         ".every(i => i.complete && i.naturalWidth > 0)")


def test_a_listing_with_id_dot_dot_opens_from_the_search_and_a_correction_on_it_saves(
        browser, console_url, console_settings, db, tmp_path):
    _seed(db, tmp_path)
    heat = np.zeros((32, 32), np.float32)
    heat[8:24, 8:24] = 1.0
    stored = overlay_png(Image.new("RGB", (32, 32), (90, 90, 90)), heat,
                         explanations_root(console_settings) / MODEL / "dotdot-colour-blue.png")
    record_explanations(db, MODEL, [("..", "colour", "blue", str(stored))])
    db.execute("INSERT INTO similar_items_online (model_version, listing_id, neighbour_ids, scores)"
               " VALUES (%s, 'L1', ARRAY['..', '.'], ARRAY[0.91, 0.84]::real[])", (MODEL,))

    page = sign_in(browser, console_url, "admin")
    page.goto(f"{console_url}/listings?q=dot-dot")
    link = page.locator("table.ls-results td:nth-child(2) a")
    assert link.all_inner_texts() == [".."] and link.get_attribute("href") == "/listing?id=.."
    assert _images_loaded(page)  # its thumbnail too (/img?id=..)
    link.click()
    page.wait_for_url(f"{console_url}/listing?id=..")
    assert page.inner_text("#ls-title") == "dot-dot jacket"
    assert _images_loaded(page)  # photo and heat map
    assert page.locator("figure.ls-why img").count() == 1

    page.locator("tr[data-group=category] input[name=value]").fill("Coat")
    page.locator("tr[data-group=category] button").click()
    page.wait_for_selector("#ls-done")
    assert page.url == f"{console_url}/listing?id=..#tags"
    assert page.inner_text("#ls-title") == "dot-dot jacket"
    assert page.locator("tr[data-group=category] td").nth(1).inner_text() == "Coat"
    assert db.execute("SELECT listing_id, old_value, new_value, corrected_by FROM corrections").fetchall() == \
        [("..", "Shirt", "Coat", "admin")]
    assert db.execute("SELECT value FROM listing_tags WHERE listing_id = '.' AND tag_group = 'category'"
                      ).fetchone() == ("Shirt",)  # not the neighbour with the other dotted id

    # from another listing's shelf, to both dotted ids
    page.goto(f"{console_url}/listings/L1")
    shelf = page.locator(".ls-shelf-item")
    assert [shelf.nth(i).get_attribute("href") for i in range(2)] == ["/listing?id=..", "/listing?id=."]
    assert _images_loaded(page)
    shelf.nth(1).click()
    page.wait_for_url(f"{console_url}/listing?id=.")
    assert page.inner_text("#ls-title") == "single dot shirt"
    assert page.request.get(f"{console_url}/listing?id=NOPE").status == 404


def test_the_listings_pages_fit_a_phone(browser, console_url, db, tmp_path, screenshots):
    _seed(db, tmp_path)
    page = sign_in(browser, console_url, "admin", viewport={"width": 390, "height": 844})
    for path, shot in (("/listings", "listings_390.png"), ("/listing?id=..", "listing_390.png")):
        page.goto(console_url + path)
        page.screenshot(path=str(screenshots / shot), full_page=True)
        wide = page.evaluate("""() => [...document.querySelectorAll('main .card, main form, main button')]
            .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5).map(e => e.className)""")
        assert wide == [], path
        assert page.evaluate("() => document.querySelector('main').scrollWidth <= window.innerWidth"), path
    page.context.close()
