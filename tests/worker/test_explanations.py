"""Heat maps of review items stored by the worker (worker/explanations.py), on the real Postgres: off by
default, one PNG and one row per review item's top candidate, the same rows when a batch runs again."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

from enrich.cli import app
from harness.images import png_bytes
from model.inference import load_predictor
from schemas.enrichment import ReviewItem
from schemas.events import ListingEvent
from tests.worker.conftest import make_settings
from worker.explanations import ReviewToExplain, explanations_root, store_explanations
from worker.pipeline import Enricher
from worker.store import upsert_listings


@pytest.fixture()
def strict_predictor(model_dir, tmp_path):
    """The test model with unreachable category and type thresholds: both always go to review."""
    strict = tmp_path / "strict-model"
    shutil.copytree(model_dir, strict)
    manifest = json.loads((strict / "manifest.json").read_text())
    manifest["thresholds"] = {"category": 1.0, "type": 1.0, "colour": 0.0}
    manifest["model_version"] = "strict-v1"
    (strict / "manifest.json").write_text(json.dumps(manifest))
    return load_predictor(strict, device="cpu")


def _enrich(db, predictor, tmp_path, settings, ids=("e1", "e2")):
    """Listings enriched by the real pipeline (without heat maps: the tests call store_explanations
    themselves); returns what the pipeline hands store_explanations."""
    paths = {}
    for i, lid in enumerate(ids):
        paths[lid] = tmp_path / f"{lid}.png"
        paths[lid].write_bytes(png_bytes((200, 40 * i, 30), size=(48, 48)))
    with db.transaction():
        upsert_listings(db, [ListingEvent(listing_id=lid, seller_id="s1", images=[str(paths[lid])]) for lid in ids])
    out = Enricher(predictor, settings.model_copy(update={"explain_review": False})).run(db, list(ids),
                                                                                         neighbours=False)
    return [ReviewToExplain(e.listing_id, predictor.preprocess(Image.open(paths[e.listing_id])), e.review)
            for e in out.enriched]


def test_off_by_default_nothing_is_explained(db, strict_predictor, tmp_path):
    settings = make_settings(tmp_path)
    assert settings.explain_review is False
    items = _enrich(db, strict_predictor, tmp_path, settings)
    assert all(review for _, _, review in items)
    assert store_explanations(db, strict_predictor, items, settings) == 0
    assert db.execute("SELECT count(*) FROM explanations").fetchone()[0] == 0
    assert not explanations_root(settings).exists()


def test_each_review_item_gets_one_heat_map_and_a_second_run_keeps_one_row(db, strict_predictor, tmp_path):
    settings = make_settings(tmp_path, explain_review=True)
    items = _enrich(db, strict_predictor, tmp_path, settings)
    queued = db.execute("SELECT listing_id, tag_group, candidates->0->>0 FROM review_queue ORDER BY 1, 2").fetchall()
    assert [q[1] for q in queued] == ["category", "type", "category", "type"]

    assert store_explanations(db, strict_predictor, items, settings) == 4
    first = db.execute("SELECT listing_id, tag_group, value, model_version, method, uri, created_at"
                       " FROM explanations ORDER BY 1, 2").fetchall()
    # the review item's top candidate, for the model that queued it
    assert [r[:4] for r in first] == [(lid, g, top, "strict-v1") for lid, g, top in queued]
    root = explanations_root(settings).resolve()
    for row in first:
        assert row[4] == "grad-cam"
        png = Image.open(row[5])
        assert png.format == "PNG" and min(png.size) >= 224
        assert str(row[5]).startswith(str(root / "strict-v1"))

    assert store_explanations(db, strict_predictor, items, settings) == 4  # the batch ran again
    again = db.execute("SELECT listing_id, tag_group, value, model_version, uri, created_at"
                       " FROM explanations ORDER BY 1, 2").fetchall()
    assert [r[:5] for r in again] == [r[:4] + (r[5],) for r in first]
    assert all(b[5] >= a[6] for a, b in zip(first, again, strict=True))
    assert len(list((root / "strict-v1").glob("*.png"))) == 4


def test_a_group_the_model_cannot_see_is_skipped_and_the_rest_stored(db, strict_predictor, tmp_path):
    settings = make_settings(tmp_path, explain_review=True)
    items = _enrich(db, strict_predictor, tmp_path, settings, ids=("t1",))
    lid, image, review = items[0]
    text_only = ReviewItem(group="fabric", candidates=[("denim", 0.55)], threshold=0.6)  # decided from text alone
    items = [ReviewToExplain(lid, image, [text_only, *review])]
    assert store_explanations(db, strict_predictor, items, settings) == len(review)
    groups = [r[0] for r in db.execute("SELECT tag_group FROM explanations ORDER BY 1").fetchall()]
    assert groups == sorted(r.group for r in review)


def test_a_failure_is_logged_and_never_raised(db, strict_predictor, tmp_path, caplog):
    settings = make_settings(tmp_path, explain_review=True)
    items = _enrich(db, strict_predictor, tmp_path, settings, ids=("f1",))
    explanations_root(settings).mkdir(parents=True)
    (explanations_root(settings) / "strict-v1").write_text("a file where the directory should be")
    assert store_explanations(db, strict_predictor, items, settings) == 0
    assert "explanations failed" in caplog.text
    assert db.execute("SELECT count(*) FROM explanations").fetchone()[0] == 0


# ------------------------------------------------------------------------- `enrich explain` end to end

@pytest.fixture()
def active_model(db, model_dir):
    """The test model registered as the active one (what `enrich explain` loads by default)."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    db.execute("INSERT INTO models (model_version, manifest, path, status, promoted_at)"
               " VALUES (%s, %s, %s, 'active', now())", (manifest["model_version"], Jsonb(manifest), str(model_dir)))
    return manifest["model_version"]


def test_enrich_explain_writes_one_overlay_per_predicted_tag(db, pg_url, predictor, active_model, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("ENRICH_DATABASE_URL", pg_url)
    monkeypatch.setenv("ENRICH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "200")
    photo = tmp_path / "x.png"
    photo.write_bytes(png_bytes((30, 90, 200), size=(60, 80)))
    with db.transaction():
        upsert_listings(db, [ListingEvent(listing_id="x:1", seller_id="s1", images=[str(photo)],
                                          attributes={"colour": "blue"}),
                             ListingEvent(listing_id="pending", seller_id="s1", images=[str(photo)])])
    Enricher(predictor, make_settings(tmp_path)).run(db, ["x:1"], neighbours=False)
    predicted = db.execute("SELECT tag_group, value FROM listing_tags WHERE listing_id = 'x:1'"
                           " AND source = 'predicted' ORDER BY 1").fetchall()
    assert [g for g, _ in predicted] == ["category", "type"]  # the seller's colour is not the model's

    out_dir = tmp_path / "why"
    result = CliRunner().invoke(app, ["explain", "x:1", "--out", str(out_dir), "--local-paths", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    written = sorted(out_dir.iterdir())
    assert len(written) == len(predicted)
    for (group, value), path in zip(predicted, written, strict=True):
        assert path.name.startswith("x_1_") and f"-{group}-" in path.name and path.suffix == ".png"
        assert str(path) in result.output and f"{group}={value}" in result.output
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size == (224, 299)  # the 60×80 photo, enlarged, not squashed

    result = CliRunner().invoke(app, ["explain", "nope", "--out", str(out_dir)])
    assert result.exit_code == 2 and "no listing 'nope'" in result.output
    result = CliRunner().invoke(app, ["explain", "pending", "--out", str(out_dir)])
    assert result.exit_code == 2 and "has no predicted tags" in result.output
    result = CliRunner().invoke(app, ["explain", "x:1", "--out", str(out_dir), "--no-local-paths"])
    assert result.exit_code == 2 and "local paths disabled" in result.output
    assert len(list(out_dir.iterdir())) == len(predicted)
