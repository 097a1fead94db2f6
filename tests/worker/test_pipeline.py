"""The enrichment core with a real model, real images (local, S3, HTTP) and the real Postgres."""
from __future__ import annotations

import io
import json
import shutil

import boto3
import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from harness.images import jpeg_bytes, png_bytes
from model.inference import load_predictor
from schemas.events import ListingEvent
from schemas.taxonomy import load_taxonomy
from tests.worker.conftest import make_settings
from worker.pipeline import Enricher
from worker.store import StoredTag, listings_to_enrich, tags_of, upsert_listings


def _add(db, *events: ListingEvent) -> None:
    with db.transaction():
        upsert_listings(db, list(events))


def _ev(lid: str, images: list[str], **kw) -> ListingEvent:
    return ListingEvent(listing_id=lid, seller_id="s1", images=images, **kw)


@pytest.fixture()
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, colour in enumerate([(220, 20, 20), (20, 20, 220), (20, 200, 20)]):
        (d / f"ok{i}.png").write_bytes(png_bytes(colour, size=(48, 48)))
    (d / "photo.jpg").write_bytes(jpeg_bytes(size=(400, 300)))
    (d / "empty.png").write_bytes(b"")
    (d / "trunc.png").write_bytes(png_bytes(size=(300, 300))[:-300])
    buf = io.BytesIO()
    Image.new("1", (3000, 3000)).save(buf, format="PNG")
    (d / "bomb.png").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.new("P", (10, 10)).save(buf, format="GIF")
    (d / "anim.gif").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, format="TIFF")
    (d / "scan.tif").write_bytes(buf.getvalue())
    (d / "notes.txt").write_bytes(b"just text, not an image")
    buf = io.BytesIO()
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(buf, format="JPEG")
    (d / "cmyk.jpg").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 30), 50000, np.uint16)).save(buf, format="PNG")
    (d / "deep.png").write_bytes(buf.getvalue())
    return d


def test_fills_only_missing_groups_with_provenance(db, predictor, images, tmp_path):
    enricher = Enricher(predictor, make_settings(tmp_path))
    _add(db, _ev("a", [str(images / "ok0.png")]),
         _ev("b", [str(images / "ok1.png")], category="Coat"),
         _ev("c", [str(images / "ok2.png")], attributes={"colour": "green"}))
    out = enricher.run(db, ["a", "b", "c"])
    assert sorted(out.enriched_ids) == ["a", "b", "c"] and out.images == 3
    a, b, c = (tags_of(db, x) for x in "abc")
    assert {g: t.source for g, t in a.items()} == {"category": "predicted", "type": "predicted", "colour": "predicted"}
    assert a["category"].value in predictor.taxonomy.category_names
    assert a["category"].model_version == "test-small-v1"
    assert a["category"].confidence is not None and 0 <= a["category"].confidence <= 1
    assert a["type"].value == predictor.taxonomy.type_of(a["category"].value)  # type follows the category
    assert b["category"] == StoredTag("category", "Coat", "seller", None, None)
    assert b["type"] == StoredTag("type", "top", "seller", None, None)
    assert b["colour"].source == "predicted"
    assert c["colour"] == StoredTag("colour", "green", "seller", None, None) and c["category"].source == "predicted"
    dims = db.execute("SELECT listing_id, dim, model_version FROM embeddings ORDER BY 1").fetchall()
    assert dims == [(x, 256, "test-small-v1") for x in "abc"]
    vec = np.frombuffer(db.execute("SELECT vector FROM embeddings LIMIT 1").fetchone()[0], "<f4")
    assert abs(np.linalg.norm(vec) - 1) < 1e-4


def test_rerun_changes_nothing(db, predictor, images, tmp_path):
    enricher = Enricher(predictor, make_settings(tmp_path))
    _add(db, _ev("a", [str(images / "ok0.png")]), _ev("b", [str(images / "ok1.png")]))
    enricher.run(db, ["a", "b"])
    tags = "SELECT listing_id, tag_group, value, source, confidence, updated_at FROM listing_tags ORDER BY 1, 2"
    before = db.execute(tags).fetchall()
    out = enricher.run(db, ["a", "b", "a"])
    after = db.execute(tags).fetchall()
    assert out.enriched == [] and sorted(out.skipped) == ["a", "b"] and before == after


def test_several_images_combined(db, predictor, images, tmp_path):
    enricher = Enricher(predictor, make_settings(tmp_path))
    paths = [str(images / f"ok{i}.png") for i in range(3)]
    _add(db, _ev("m", paths))
    out = enricher.run(db, ["m"])
    assert out.images == 3
    preds = predictor.predict_images([Image.open(p).convert("RGB") for p in paths])
    want = preds.embedding.mean(0)
    want /= np.linalg.norm(want)
    got = np.frombuffer(db.execute("SELECT vector FROM embeddings").fetchone()[0], "<f4")
    assert np.allclose(got, want, atol=1e-5)
    confidence = tags_of(db, "m")["category"].confidence
    assert confidence is not None and abs(confidence - preds.category.mean(0).max()) < 1e-5


def test_hostile_images_rejected_with_reasons_and_core_keeps_going(db, predictor, images, tmp_path):
    enricher = Enricher(predictor, make_settings(tmp_path))
    bad = ["empty.png", "trunc.png", "bomb.png", "scan.tif", "notes.txt"]
    _add(db, *[_ev(f"bad-{i}", [str(images / name)]) for i, name in enumerate(bad)],
         _ev("mixed", [str(images / "bomb.png"), str(images / "ok0.png")]),
         _ev("cmyk", [str(images / "cmyk.jpg")]), _ev("deep", [str(images / "deep.png")]),
         _ev("jpeg", [str(images / "photo.jpg")]), _ev("http-off", ["http://169.254.169.254/x.png"]))

    def rejected(reason: str) -> float:
        return REGISTRY.get_sample_value("enrich_images_rejected_total", {"reason": reason}) or 0.0

    bombs_before = rejected("too many pixels")
    out = enricher.run(db, [f"bad-{i}" for i in range(5)] + ["mixed", "cmyk", "deep", "jpeg", "http-off"])
    assert rejected("too many pixels") - bombs_before == 2  # bad-2 and the bomb beside a good photo
    assert sorted(out.enriched_ids) == ["cmyk", "deep", "jpeg", "mixed"]
    rows = dict(db.execute("SELECT listing_id, error FROM listings WHERE status = 'failed'").fetchall())
    assert set(rows) == {f"bad-{i}" for i in range(5)} | {"http-off"}
    assert "empty file" in rows["bad-0"] and "corrupt image" in rows["bad-1"]
    assert "too many pixels" in rows["bad-2"] and "format not allowed" in rows["bad-3"]
    assert "not an image" in rows["bad-4"] and "host not allowed" in rows["http-off"]
    # permanent failures are final: a rerun does not touch them again
    assert enricher.run(db, ["bad-0"]).skipped == ["bad-0"]


def test_below_threshold_goes_to_review_not_tags(db, model_dir, images, tmp_path):
    strict = tmp_path / "strict-model"
    shutil.copytree(model_dir, strict)
    manifest = json.loads((strict / "manifest.json").read_text())
    manifest["thresholds"] = {"category": 1.0, "type": 1.0}  # unreachable: everything goes to review
    manifest["model_version"] = "strict-v1"
    (strict / "manifest.json").write_text(json.dumps(manifest))
    enricher = Enricher(load_predictor(strict, device="cpu"), make_settings(tmp_path, default_threshold=0.0))
    _add(db, _ev("r", [str(images / "ok0.png")]))
    enricher.run(db, ["r"])
    tags = tags_of(db, "r")
    assert set(tags) == {"colour"}  # default threshold 0 for colour: filled
    review = db.execute("SELECT tag_group, candidates, threshold, model_version FROM review_queue ORDER BY 1"
                        ).fetchall()
    assert [r[0] for r in review] == ["category", "type"]
    cands = review[0][1]
    assert len(cands) == 3 and cands[0][1] >= cands[1][1] >= cands[2][1] and review[0][2] == 1.0
    assert review[0][3] == "strict-v1"


def test_s3_and_http_images(db, predictor, s3_endpoint, http_dir, tmp_path):
    base, root = http_dir
    (root / "h.jpg").write_bytes(jpeg_bytes(size=(120, 90), seed=3))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="listing-images")
    s3.put_object(Bucket="listing-images", Key="x/1.png", Body=png_bytes((5, 100, 200)))
    settings = make_settings(tmp_path, s3_endpoint_url=s3_endpoint, allow_local_paths=False)
    _add(db, _ev("s3", ["s3://listing-images/x/1.png"]), _ev("web", [f"{base}/h.jpg"]),
         _ev("gone", [f"{base}/missing.jpg"]))
    out = Enricher(predictor, settings).run(db, ["s3", "web", "gone"])
    assert sorted(out.enriched_ids) == ["s3", "web"] and list(out.failed) == ["gone"]
    assert db.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 2


def test_transient_source_failure_is_retried_not_failed(db, predictor, http_dir, tmp_path):
    base, _ = http_dir
    enricher = Enricher(predictor, make_settings(tmp_path))
    _add(db, _ev("down", [f"{base}/boom"]))
    out = enricher.run(db, ["down"])
    assert list(out.retry) == ["down"] and not out.failed
    assert db.execute("SELECT status FROM listings").fetchone()[0] == "pending"
    out = enricher.run(db, ["down"], accept_partial=True)  # last attempt: give up with the reason
    assert "http server error" in out.failed["down"]


def test_chunked_pipelined_forward_matches_one_pass(db, predictor, images, tmp_path):
    """Forward chunks of 1 image (decode overlapping the model) give the same rows as one big pass."""
    events = [_ev("x", [str(images / "ok0.png"), str(images / "ok1.png")]), _ev("y", [str(images / "photo.jpg")]),
              _ev("z", [str(images / "empty.png")]), _ev("w", [str(images / "ok2.png"), str(images / "cmyk.jpg")])]
    _add(db, *events)
    items = listings_to_enrich(db, ["x", "y", "z", "w"], predictor.version)
    one, rows_one = Enricher(predictor, make_settings(tmp_path, batch_size=64)).infer(items)
    many, rows_many = Enricher(predictor, make_settings(tmp_path, batch_size=1)).infer(items)
    assert one.images == many.images == 5 and list(one.failed) == list(many.failed) == ["z"]
    for (_, e1, v1), (_, e2, v2) in zip(rows_one, rows_many, strict=True):
        assert e1.listing_id == e2.listing_id and np.allclose(v1, v2, atol=1e-5)
        assert {g: t.value for g, t in e1.tags.items()} == {g: t.value for g, t in e2.tags.items()}


def test_shelf_vectors_carry_the_category_and_review_items_get_heat_maps(db, model_dir, images, tmp_path):
    """The stored embedding is the shelf embedding (image part + the one-hot of the
    listing's category: the seller's where given), and with ENRICH_EXPLAIN_REVIEW each review item's top
    candidate gets a heat map after the commit."""
    shelf = tmp_path / "shelf-model"
    shutil.copytree(model_dir, shelf)
    manifest = json.loads((shelf / "manifest.json").read_text())
    manifest.update(model_version="shelf-v1", shelf_category_weight=0.3,
                    thresholds={"category": 1.0, "type": 1.0, "colour": 0.0})  # category and type to review
    (shelf / "manifest.json").write_text(json.dumps(manifest))
    predictor = load_predictor(shelf, device="cpu")
    names = load_taxonomy("fashion-mnist").category_names
    settings = make_settings(tmp_path, explain_review=True, data_dir=tmp_path / "data")
    _add(db, _ev("seller-coat", [str(images / "ok0.png")], category="Coat"), _ev("unsure", [str(images / "ok1.png")]))
    Enricher(predictor, settings).run(db, ["seller-coat", "unsure"])
    vectors = {lid: np.frombuffer(v, "<f4") for lid, v in db.execute(
        "SELECT listing_id, vector FROM embeddings WHERE model_version = 'shelf-v1'")}
    assert {len(v) for v in vectors.values()} == {predictor.manifest.embedding_dim + len(names)}
    for v in vectors.values():
        np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-5)
        assert np.count_nonzero(v[-len(names):]) == 1
    assert np.argmax(vectors["seller-coat"][-len(names):]) == names.index("Coat")
    why = db.execute("SELECT listing_id, tag_group, uri FROM explanations ORDER BY 1, 2").fetchall()
    assert [(lid, g) for lid, g, _ in why] == [("unsure", "category"), ("unsure", "type")]  # the seller's: none
    for _, _, uri in why:
        assert Image.open(uri).format == "PNG"
