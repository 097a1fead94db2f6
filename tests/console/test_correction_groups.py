"""A correction only ever sets a group the listing's taxonomy defines, to one of that group's values, and only
where the group applies to the listing's category; anything else is refused and nothing is stored (no
corrections row, no tag change). Both ways in: the listing page's form and the review queue."""
from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

import pytest
from psycopg.types.json import Jsonb

from enrich.console import review_queue as queue
from schemas.taxonomy import load_taxonomy
from tests.console.test_review import MODEL, _http_login, seed_listings


def _post_correct(opener, base: str, listing_id: str, data: dict, token: str) -> int:
    """POST the listing page's correction form; returns the status (a redirect back to the listing)."""
    req = urllib.request.Request(f"{base}/listings/{urllib.parse.quote(listing_id, safe='')}/correct",
                                 data=urllib.parse.urlencode(data).encode(), headers={"X-CSRF-Token": token})
    try:
        with opener.open(req) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:  # the opener does not follow redirects
        return exc.code


def _flash(opener, base: str, listing_id: str) -> str:
    with opener.open(f"{base}/listings/{urllib.parse.quote(listing_id, safe='')}") as resp:
        return resp.read().decode()


def _stored(db, listing_id: str) -> tuple:
    return (db.execute("SELECT tag_group, new_value FROM corrections WHERE listing_id = %s ORDER BY 1",
                       (listing_id,)).fetchall(),
            db.execute("SELECT tag_group, value, source FROM listing_tags WHERE listing_id = %s ORDER BY 1",
                       (listing_id,)).fetchall(),
            db.execute("SELECT count(*) FROM console_actions WHERE action LIKE '%%correct'").fetchone()[0])


def _deepfashion_listing(db, tmp_path, category: str) -> str:
    """A listing tagged by a model whose taxonomy is deepfashion, with this category."""
    lid = seed_listings(db, tmp_path, 1, prefix=f"D{category}", review_group="texture", category=category,
                        candidates=[("floral", 0.4), ("solid", 0.3)])[0]
    tax = load_taxonomy("deepfashion").model_dump(mode="json")
    db.execute("UPDATE models SET manifest = %s WHERE model_version = %s",
               (Jsonb({"model_version": MODEL, "taxonomy": tax}), MODEL))
    return lid


def test_a_group_the_taxonomy_does_not_define_is_refused_and_nothing_is_stored(console_url, db, tmp_path):
    lid = seed_listings(db, tmp_path, 1)[0]
    opener, token = _http_login(console_url, "reviewer", "reviewer-password-1")
    before = _stored(db, lid)
    assert _post_correct(opener, console_url, lid, {"group": "evil_group", "value": "x"}, token) == 303
    assert _stored(db, lid) == before
    assert "evil_group is not a tag group of" in _flash(opener, console_url, lid)
    # the same form with a group the taxonomy has goes through
    assert _post_correct(opener, console_url, lid, {"group": "colour", "value": "blue"}, token) == 303
    assert _stored(db, lid)[0] == [("colour", "blue")]


@pytest.mark.parametrize("value", ["navy", "n/a", "Blue"])
def test_a_value_that_is_not_one_of_the_groups_values_is_refused(console_url, db, tmp_path, value):
    lid = seed_listings(db, tmp_path, 1)[0]
    opener, token = _http_login(console_url, "reviewer", "reviewer-password-1")
    before = _stored(db, lid)
    _post_correct(opener, console_url, lid, {"group": "colour", "value": value}, token)
    assert _stored(db, lid) == before
    assert "is not a value of colour" in _flash(opener, console_url, lid)


def test_a_group_that_does_not_apply_to_the_listings_category_is_refused(console_url, db, tmp_path):
    jeans = _deepfashion_listing(db, tmp_path, "Jeans")  # a bottom: no sleeves
    dress = _deepfashion_listing(db, tmp_path, "Dress")
    opener, token = _http_login(console_url, "reviewer", "reviewer-password-1")
    before = _stored(db, jeans)
    _post_correct(opener, console_url, jeans, {"group": "sleeve", "value": "long_sleeve"}, token)
    assert _stored(db, jeans) == before
    assert "sleeve does not apply to Jeans" in _flash(opener, console_url, jeans)
    _post_correct(opener, console_url, dress, {"group": "sleeve", "value": "long_sleeve"}, token)
    assert _stored(db, dress)[0] == [("sleeve", "long_sleeve")]


def test_without_any_taxonomy_every_correction_is_refused(console_url, db, tmp_path):
    lid = seed_listings(db, tmp_path, 1)[0]
    db.execute("DELETE FROM models")
    opener, token = _http_login(console_url, "reviewer", "reviewer-password-1")
    before = _stored(db, lid)
    _post_correct(opener, console_url, lid, {"group": "colour", "value": "blue"}, token)
    assert _stored(db, lid) == before
    assert "no taxonomy" in _flash(opener, console_url, lid)


def test_the_review_queue_goes_through_the_same_checks(db, tmp_path):
    lid = seed_listings(db, tmp_path, 1, review_group="colour", candidates=[("blue", 0.4), ("purple", 0.3)])[0]
    # an item for a group the taxonomy lacks (a model that queued something it should not have)
    db.execute("INSERT INTO review_queue (listing_id, tag_group, candidates, threshold, model_version)"
               " VALUES (%s, 'evil_group', %s, 0.6, %s)", (lid, Jsonb([["x", 0.5]]), MODEL))
    before = _stored(db, lid)
    item = queue.next_item(db, "ann", queue.Filters(group="colour"), [], 300)
    for value in ("navy", "Shirt", "<b>"):
        with pytest.raises(queue.Conflict, match="is not a value of colour"):
            queue.correct_item(db, "ann", item, value)
    item = queue.next_item(db, "ann", queue.Filters(group="evil_group"), [], 300)
    with pytest.raises(queue.Conflict, match="evil_group is not a tag group"):
        queue.correct_item(db, "ann", item, "x")
    assert _stored(db, lid) == before
    assert db.execute("SELECT count(*) FROM review_queue WHERE resolved_at IS NOT NULL").fetchone()[0] == 0
