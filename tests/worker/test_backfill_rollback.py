"""The backfill after a rollback (or a promotion whose earlier backfill was interrupted) rewrites what another model
version wrote: real Postgres, real small models, a real Celery worker on Redis for the interrupted chain."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from enrich.cli import app as cli
from harness.images import png_bytes
from model.registry import promote, rollback
from schemas.events import ListingEvent
from tests.worker.conftest import make_settings
from tests.worker.test_backfill import (
    V1,
    V2,
    _activate,
    _catalogue,
    _correct_category,
    _enricher,
    _kept_tags,
    _per_version,
    _worker,
)
from tests.worker.test_backfill import models as models  # a fixture: pytest finds it by its name here
from tests.worker.test_backfill import worker_env as worker_env  # a fixture
from worker.backfill import Cursor, count_todo, progress, run_chunk, run_inline, start
from worker.store import upsert_listings


class _Recording:
    """An Enricher that remembers every listing it wrote (to tell that a backfill wrote each listing once)."""

    def __init__(self, enricher) -> None:
        self.enricher = enricher
        self.written: list[str] = []

    @property
    def model_version(self) -> str:
        return self.enricher.model_version

    def run(self, conn, listing_ids, **kw):
        out = self.enricher.run(conn, listing_ids, **kw)
        self.written += out.enriched_ids + list(out.failed)
        return out


def _rows_of(db, version: str) -> tuple[int, int]:
    """(predicted tags, open review items) the version wrote that are still there."""
    tags = db.execute("SELECT count(*) FROM listing_tags WHERE source = 'predicted' AND model_version = %s",
                      (version,)).fetchone()[0]
    review = db.execute("SELECT count(*) FROM review_queue WHERE resolved_at IS NULL AND model_version = %s",
                        (version,)).fetchone()[0]
    return tags, review


def _enriched_by(db) -> dict[str, str | None]:
    return dict(db.execute("SELECT listing_id, enriched_by FROM listings WHERE status = 'enriched'").fetchall())


def _add_listing(db, tmp_path, lid: str, colour=(10, 200, 10), **event) -> None:
    path = tmp_path / f"{lid}.png"
    path.write_bytes(png_bytes(colour))
    with db.transaction():
        upsert_listings(db, [ListingEvent(listing_id=lid, seller_id="s", images=[str(path)], **event)])


def test_the_backfill_after_a_rollback_rewrites_every_row_the_rolled_back_model_wrote(db, models, tmp_path):
    """v1 enriches the catalogue, v2 is promoted, backfilled and tags a new listing, then v1 is rolled back to: its
    backfill leaves no predicted tag nor open review item of v2, keeps seller and corrected tags, writes every
    listing once, and a second run writes nothing."""
    settings = make_settings(tmp_path, task_listings=4)
    _activate(db, models, V1)
    live = _catalogue(db, tmp_path, 12)
    _enricher(models, V1, settings).run(db, live)
    _correct_category(db, "bf-05")
    _activate(db, models, V2)
    e2 = _enricher(models, V2, settings)
    assert run_inline(db, e2, settings).status == "done"
    _add_listing(db, tmp_path, "bf-new")  # arrives while v2 serves: no model but v2 ever saw it
    e2.run(db, ["bf-new"])
    kept = _kept_tags(db)
    assert all(_rows_of(db, V2)) and _rows_of(db, V1) == (0, 0)

    rollback(db, V1, actor="test", reason="v2 tags worse than v1")
    e1 = _Recording(_enricher(models, V1, settings))
    assert count_todo(db, V1) == 11  # every live listing but the failed one: v2 wrote them all
    done = run_inline(db, e1, settings)

    assert _rows_of(db, V2) == (0, 0)
    assert set(_per_version(db, "listing_tags", "source = 'predicted'")) == {V1}
    assert set(_per_version(db, "review_queue", "resolved_at IS NULL")) == {V1}
    assert _kept_tags(db) == kept  # seller and corrected tags untouched
    rewritten = set(live + ["bf-new"]) - {"bf-04"}
    assert sorted(e1.written) == sorted(rewritten)  # each listing written once
    assert _enriched_by(db) == dict.fromkeys(rewritten, V1)
    assert _per_version(db, "embeddings")[V1] == (11, 11)  # bf-new too, for v1's shelves
    assert (done.status, done.total, done.done) == ("done", 12, 12)  # bf-04 failed on this content: done

    e1.written.clear()
    assert run_inline(db, e1, settings).status == "done" and e1.written == []  # idempotent


def test_a_promotion_whose_earlier_backfill_was_interrupted_finishes_on_a_fresh_enrich_backfill(worker_env, db,
                                                                                               models, tmp_path):
    """v2's backfill stops after a chunk; v1 is rolled back to (its backfill restores v1 everywhere) and a listing
    v2 had embedded is edited under v1; v2 is promoted again and its backfill stops mid-way once more (a dead
    chain: the row stops moving). `enrich backfill --wait` sends a fresh request that a real worker finishes:
    every listing carries v2, the edited one included although a (stale) v2 embedding of it existed."""
    settings, queues = worker_env
    _activate(db, models, V1)
    live = _catalogue(db, tmp_path, 12)
    _enricher(models, V1, settings).run(db, live)
    _correct_category(db, "bf-05")
    kept = _kept_tags(db)

    _activate(db, models, V2)
    e2 = _enricher(models, V2, settings)
    start(db, V2)
    step = run_chunk(db, e2, V2, Cursor(), settings.task_listings)  # the chain stops after its first chunk
    assert step.ids == ["bf-00", "bf-01", "bf-02"]

    rollback(db, V1, actor="test", reason="v2 looks wrong")
    e1 = _enricher(models, V1, settings)
    assert run_inline(db, e1, settings).status == "done"
    assert _rows_of(db, V2) == (0, 0)  # v1's backfill restored the first chunk too
    _add_listing(db, tmp_path, "bf-02", colour=(250, 250, 0), title="repainted")  # edited while v1 serves: its v2
    # embedding (of the old photo) is stale
    e1.run(db, ["bf-02"])

    assert promote(db, V2, actor="test", reason="v2 fixed after all").promoted
    start(db, V2)
    run_chunk(db, e2, V2, Cursor(), settings.task_listings)
    db.execute("UPDATE backfills SET updated_at = now() - interval '1 hour' WHERE model_version = %s", (V2,))
    assert progress(db, V2).status == "running"

    with _worker(list(queues.values())):
        res = CliRunner().invoke(cli, ["backfill", "--wait", "--interval", "0.2", "--timeout", "120"])
    assert res.exit_code == 0, res.output
    assert "it had stopped moving" in res.output and f"backfill of {V2} done: 11/11 listings" in res.output

    assert _rows_of(db, V1) == (0, 0)
    assert set(_per_version(db, "listing_tags", "source = 'predicted'")) == {V2}
    assert set(_per_version(db, "review_queue", "resolved_at IS NULL")) == {V2}
    assert _enriched_by(db) == dict.fromkeys(set(live) - {"bf-04"}, V2)
    assert _kept_tags(db) == kept
    assert _per_version(db, "embeddings")[V2] == (10, 10)  # one per listing, the stale one replaced


@pytest.mark.parametrize("status", ["enriched", "failed"])
def test_enriched_by_names_the_version_whose_rows_a_listing_carries(db, models, tmp_path, status):
    """The write path sets enriched_by with the rows; a failure (an image no model can read) leaves both."""
    settings = make_settings(tmp_path)
    _activate(db, models, V1)
    _catalogue(db, tmp_path, 3)
    _enricher(models, V1, settings).run(db, ["bf-02"])
    if status == "failed":  # edited, and its new photo is broken
        _add_listing(db, tmp_path, "bf-02", title="edited")
        (tmp_path / "bf-02.png").write_bytes(b"not an image")
    _enricher(models, V2, settings).run(db, ["bf-02"])
    row = db.execute("SELECT status, enriched_by FROM listings WHERE listing_id = 'bf-02'").fetchone()
    assert row == (status, V2 if status == "enriched" else V1)
