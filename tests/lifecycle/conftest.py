"""The lifecycle tests reuse the worker fixtures (Celery configured per test), and enrich through the real worker."""
from core.celery_app import send_enrich
from schemas.events import ListingEvent
from tests.worker.conftest import use_celery, wait_until  # noqa: F401 - a fixture
from worker.store import upsert_listings


def enrich_via_worker(db, settings, ids, image, **event) -> None:
    """Upsert listings with one photo (and any event fields), send them to the worker, wait until enriched."""
    with db.transaction():
        upsert_listings(db, [ListingEvent(listing_id=i, seller_id="s", images=[str(image)], **event) for i in ids])
    send_enrich(ids, settings)
    wait_until(lambda: db.execute("SELECT count(*) FROM listings WHERE listing_id = ANY(%s) AND status = 'enriched'",
                                  (ids,)).fetchone()[0] == len(ids), timeout=180)
