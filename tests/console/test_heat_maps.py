"""The listing page shows a review item's stored heat map ("why") to a signed-in reviewer; the heat-map route
serves only files the explanations table names under the explanations directory (over plain HTTP)."""
from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np
from PIL import Image

from model.explain import overlay_png
from tests.console.conftest import PASSWORDS
from tests.console.test_review import MODEL, _http_login, _NoRedirect, seed_listings
from worker.explanations import explanations_root, record_explanations


def _get(opener, url: str) -> tuple[int, dict, bytes]:
    try:
        with opener.open(url) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_a_reviewer_sees_the_heat_map_of_a_review_item(console_url, console_settings, db, tmp_path):
    seed_listings(db, tmp_path, 2, review_group="colour", candidates=[("blue", 0.4), ("purple", 0.3)])
    heat = np.zeros((32, 32), np.float32)
    heat[8:24, 8:24] = 1.0
    stored = overlay_png(Image.new("RGB", (32, 32), (90, 90, 90)), heat,
                         explanations_root(console_settings) / MODEL / "L000-colour-blue.png")
    outside = overlay_png(Image.new("RGB", (32, 32)), heat, tmp_path / "elsewhere.png")
    record_explanations(db, MODEL, [("L000", "colour", "blue", str(stored)),
                                    ("L000", "category", "Shirt", str(outside)),
                                    ("L001", "colour", "<b>bold</b>", str(stored))])
    opener, _ = _http_login(console_url, "reviewer", PASSWORDS["reviewer"])

    status, _, body = _get(opener, f"{console_url}/listings/L000")
    html = body.decode()
    assert status == 200
    src = f"/listings/L000/why/colour?model={MODEL}"
    assert f'<img src="{src}"' in html and "blue</figcaption>" in html
    status, headers, png = _get(opener, console_url + src)
    assert status == 200 and headers["content-type"] == "image/png" and png == stored.read_bytes()

    # a row pointing outside the explanations directory, an unknown group or model: nothing is served
    for path in ("/listings/L000/why/category?model=" + MODEL, "/listings/L000/why/type?model=" + MODEL,
                 "/listings/L000/why/colour?model=other", "/listings/NOPE/why/colour?model=" + MODEL,
                 "/listings/L000/why/colour"):
        assert _get(opener, console_url + path)[0] in (404, 422), path
    # the category was never queued for review: no "why" for it on the page
    assert "/why/category" not in html

    status, _, body = _get(opener, f"{console_url}/listings/L001")
    assert "&lt;b&gt;bold&lt;/b&gt;</figcaption>" in body.decode() and "<b>bold</b>" not in body.decode()

    status, headers, _ = _get(urllib.request.build_opener(_NoRedirect()), console_url + src)
    assert status == 401 and "image" not in headers.get("content-type", "")  # nobody signed out gets a heat map


def test_a_listing_without_stored_heat_maps_shows_none(console_url, db, tmp_path):
    seed_listings(db, tmp_path, 1, review_group="colour", candidates=[("blue", 0.4), ("purple", 0.3)])
    opener, _ = _http_login(console_url, "reviewer", PASSWORDS["reviewer"])
    status, _, body = _get(opener, f"{console_url}/listings/L000")
    assert status == 200 and 'data-review-group="colour"' in body.decode() and "/why/" not in body.decode()

