"""Registry and corrections against the real Postgres (fixture `db`)."""
import json
from datetime import UTC, datetime, timedelta

import pytest

from core.config import Settings
from model.checkpoint import save_model
from model.network import build_model
from model.registry import active_model, get_model, register_candidate
from schemas.taxonomy import load_taxonomy
from training.corrections import correction_labels
from training.gate import PASS, REFUSED, decide, promote

pytestmark = pytest.mark.integration


def _model_dir(tmp_path, version, metrics):
    tax = load_taxonomy("fashion-mnist")
    model = build_model("small_cnn", tax, pretrained=False, embedding_dim=16)
    save_model(model, tmp_path / version, model_version=version, image_size=28, metrics=metrics)
    return tmp_path / version


def test_compare_gate():
    v = decide({"test/top1": 0.9, "test/attr/hamming": 0.02}, {"test/top1": 0.9, "test/attr/hamming": 0.01})
    assert not v.passed and "hamming" in v.reasons[0]
    assert decide({"test/top1": 0.91}, {"test/top1": 0.9}).outcome == PASS
    assert not decide({"x": 1.0}, {"y": 1.0}).passed
    v = decide({"test/top1": 0.99, "eval/test_rows": 20000.0}, {"test/top1": 0.5, "eval/test_rows": 30000.0})
    assert v.outcome == REFUSED and "different evaluation sets" in v.reasons[0]


def test_first_candidate_becomes_active_then_gate_decides(db, tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    a = register_candidate(db, _model_dir(tmp_path, "m-a", {"test/top1": 0.90, "test/recall@1": 0.80}))
    assert a.status == "candidate"
    d = promote(db, "m-a", settings, actor="cli")
    assert d.promoted and d.previous is None and active_model(db).model_version == "m-a"

    register_candidate(db, _model_dir(tmp_path, "m-worse", {"test/top1": 0.95, "test/recall@1": 0.70}))
    d = promote(db, "m-worse", settings, actor="cli")
    assert not d.promoted and "recall@1" in d.reasons[0]
    assert get_model(db, "m-worse").status == "rejected"
    assert active_model(db).model_version == "m-a"

    register_candidate(db, _model_dir(tmp_path, "m-better", {"test/top1": 0.92, "test/recall@1": 0.80}))
    d = promote(db, "m-better", settings, actor="cli")
    assert d.promoted and d.previous == "m-a"
    assert get_model(db, "m-a").status == "retired"
    rows = db.execute("SELECT model_version FROM models WHERE status = 'active'").fetchall()
    assert rows == [("m-better",)]
    manifest = db.execute("SELECT manifest FROM models WHERE model_version = 'm-better'").fetchone()[0]
    assert manifest["model_version"] == "m-better" and manifest["backbone"] == "small_cnn"


def test_register_is_idempotent_and_unknown_promote_fails(db, tmp_path):
    d = _model_dir(tmp_path, "m-x", {"test/top1": 0.5})
    register_candidate(db, d)
    register_candidate(db, d)
    assert db.execute("SELECT count(*) FROM models").fetchone()[0] == 1
    with pytest.raises(LookupError):
        promote(db, "nope", Settings(data_dir=tmp_path / "data"), actor="cli")


def test_correction_labels_latest_per_group(db):
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash) VALUES (%s, %s, %s::jsonb, %s)",
               ("l1", "s1", json.dumps({"images": ["s3://b/l1.jpg"]}), "h"))
    rows = [("e1", "l1", "category", "Shirt", t0), ("e2", "l1", "category", "Coat", t0 + timedelta(hours=1)),
            ("e3", "l1", "colour", "red", t0), ("e4", "l2", "colour", "magenta", t0),
            ("e5", "l2", "sleeve", "long", t0)]
    for eid, lid, grp, val, at in rows:
        db.execute("INSERT INTO corrections (event_id, listing_id, tag_group, new_value, corrected_by, corrected_at)"
                   " VALUES (%s, %s, %s, %s, 'reviewer', %s)", (eid, lid, grp, val, at))
    labels = correction_labels(db, load_taxonomy("fashion-mnist"))
    got = {(lab.listing_id, lab.group): (lab.value, lab.index, lab.images) for lab in labels}
    assert got == {("l1", "category"): ("Coat", 4, ["s3://b/l1.jpg"]), ("l1", "colour"): ("red", 2, ["s3://b/l1.jpg"])}
    assert len(correction_labels(db)) == 4  # without a taxonomy nothing is filtered
