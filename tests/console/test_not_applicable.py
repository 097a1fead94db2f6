"""The listing page shows attribute groups that do not apply to the listing's category as n/a."""
from __future__ import annotations

import re

import numpy as np
from psycopg.types.json import Jsonb

from schemas.enrichment import Enrichment, TagSource, TagValue
from schemas.events import ListingEvent
from schemas.taxonomy import load_taxonomy
from tests.console.conftest import PASSWORDS
from tests.console.test_review import _http_login
from worker.store import listings_to_enrich, upsert_listings, write_enrichments

MODEL = "df-model"


def _found(pattern: str, text: str) -> str:
    m = re.search(pattern, text, re.S)
    assert m is not None, pattern
    return m.group(1)


def _cell(html: str, group: str) -> str:
    row = _found(rf'<tr data-group="{group}">(.*?)</tr>', html)
    return re.sub(r"<[^>]+>", " ", _found(r'<td class="ls-value[^"]*">(.*?)</td>', row)).strip()


def test_groups_that_do_not_apply_to_the_category_show_as_n_a(console_url, db):
    db.execute("INSERT INTO models (model_version, manifest, path, status, promoted_at)"
               " VALUES (%s, %s, '/nowhere', 'active', now())",
               (MODEL, Jsonb({"model_version": MODEL,
                              "taxonomy": load_taxonomy("deepfashion").model_dump(mode="json")})))
    events = [ListingEvent(listing_id=lid, seller_id="s1", images=["s3://b/x.jpg"], category=cat)
              for lid, cat in (("J1", "Jeans"), ("D1", "Dress"))]
    with db.transaction():
        upsert_listings(db, events)
    rows = []
    for item in listings_to_enrich(db, ["J1", "D1"], MODEL):
        tags = {"category": TagValue(value=item.event.category, source=TagSource.seller),
                "texture": TagValue(value="solid", source=TagSource.predicted, confidence=0.9, model_version=MODEL)}
        enrichment = Enrichment(listing_id=item.listing_id, model_version=MODEL, tags=tags)
        rows.append((item, enrichment, np.ones(4, np.float32)))
    with db.transaction():
        write_enrichments(db, rows, [])
    opener, _ = _http_login(console_url, "reviewer", PASSWORDS["reviewer"])
    with opener.open(f"{console_url}/listings/J1") as resp:
        jeans = resp.read().decode()
    assert [_cell(jeans, g) for g in ("sleeve", "length", "neckline")] == ["n/a"] * 3
    assert "does not apply to Jeans" in jeans
    assert _cell(jeans, "texture") == "solid" and _cell(jeans, "fabric") == "—"  # applies, not tagged yet
    with opener.open(f"{console_url}/listings/D1") as resp:
        dress = resp.read().decode()
    assert "n/a" not in dress and _cell(dress, "sleeve") == "—"
