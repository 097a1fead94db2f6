"""The review card says, in words, which rule queued the item, served for real and read in Chromium:
a title that contradicts the photo, a plainly unsure model, an item stored before reasons, and seller words
that stay text."""
from __future__ import annotations

import numpy as np

from schemas.enrichment import Enrichment, ReviewItem
from schemas.events import ListingEvent
from schemas.taxonomy import load_taxonomy
from tests.console.conftest import sign_in
from tests.console.test_review import MODEL, add_model, png, press_and_wait
from worker.store import listings_to_enrich, upsert_listings, write_enrichments
from worker.tagging import decide

FM = load_taxonomy("fashion-mnist")
COLOURS = FM.group("colour").values


def _probs(values: list[str], top: str, p: float) -> np.ndarray:
    out = np.full(len(values), (1.0 - p) / (len(values) - 1))
    out[values.index(top)] = p
    return out


def _queue(db, tmp_path, listing_id: str, title: str, red: float, stored_reason: bool = True) -> None:
    """One listing through decide() and the worker's store: its colour goes to review (threshold 0.7)."""
    event = ListingEvent(listing_id=listing_id, seller_id="s1", title=title,
                         images=[png(tmp_path / "img" / f"{listing_id}.png")])
    with db.transaction():
        upsert_listings(db, [event])
    [item] = listings_to_enrich(db, [listing_id], MODEL)
    enr = decide(event, FM, MODEL, _probs(FM.category_names, "Pullover", 0.9),
                 {"colour": _probs(COLOURS, "red", red)}, {"colour": 0.7}, {}, 0.5)
    if not stored_reason:  # as the worker wrote it before reasons existed
        enr = Enrichment(**{**enr.model_dump(), "review": [ReviewItem(**{**r.model_dump(), "reason": None})
                                                            for r in enr.review]})
    with db.transaction():
        write_enrichments(db, [(item, enr, np.ones(4, np.float32))], [])


def test_the_card_says_which_rule_queued_the_item(browser, console_url, db, tmp_path):
    add_model(db)
    _queue(db, tmp_path, "L1", "Jumper in lilac", red=0.8)
    _queue(db, tmp_path, "L2", "Jumper", red=0.62)
    _queue(db, tmp_path, "L3", "Jumper", red=0.62, stored_reason=False)
    _queue(db, tmp_path, "L4", "Jumper in navy</> blue", red=0.8)
    page = sign_in(browser, console_url, "reviewer")
    page.goto(f"{console_url}/review")

    def shown() -> tuple[str, str]:
        return page.get_attribute("#rv-current", "data-listing"), page.inner_text("#rv-reason")

    assert shown() == ("L1", "The title says 'lilac' (purple) but the photo looks red (80 %).")
    press_and_wait(page, "s")
    assert shown() == ("L2", "The model's best guess, red at 62 %, is below the 70 % this group needs.")
    press_and_wait(page, "s")
    assert shown() == ("L3", "(the model was below its threshold 0.70: best guess 0.62)")
    press_and_wait(page, "s")
    # the seller's words are text: markup in them is shown, never parsed (a parsed "</>" would vanish)
    assert shown() == ("L4", "The title says 'navy</> blue' (blue) but the photo looks red (80 %).")
