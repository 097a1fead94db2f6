"""Replay (training.replay): a retraining job trains on people's corrections *and* on the catalogue listings the
active model tagged surest, with its own tags — never on corrected, failed or other models' listings."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.config import Settings
from training.replay import confident_labels


def _listing(db, lid: str, tags: dict[str, tuple[str, float]], model: str = "m1", status: str = "enriched",
             photo=None) -> None:
    db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash, status)"
               " VALUES (%s, 's', %s, 'h', %s)", (lid, json.dumps({"images": [str(photo or f"/{lid}.png")]}), status))
    for group, (value, confidence) in tags.items():
        db.execute("INSERT INTO listing_tags (listing_id, tag_group, value, source, confidence, model_version)"
                   " VALUES (%s, %s, %s, 'predicted', %s, %s)", (lid, group, value, confidence, model))


def _correct(db, lid: str) -> None:
    db.execute("INSERT INTO corrections (event_id, listing_id, tag_group, new_value, corrected_by, corrected_at)"
               " VALUES (%s, %s, 'category', 'Shirt', 'reviewer', now())", (f"e-{lid}", lid))


def test_the_surest_listings_of_the_active_model_with_their_sure_tags(db, fmnist_taxonomy):
    _listing(db, "a", {"category": ("Bag", 0.99), "colour": ("red", 0.97), "type": ("bags", 0.99)})
    _listing(db, "b", {"category": ("Shirt", 0.95), "colour": ("blue", 0.6)})  # an unsure colour stays out
    _listing(db, "c", {"category": ("Coat", 0.92)})  # sure, but the limit is 2
    _listing(db, "d", {"category": ("Dress", 0.5)})  # unsure
    _listing(db, "e", {"category": ("Sandal", 0.999)})
    _correct(db, "e")  # people's label wins: not replayed
    _listing(db, "f", {"category": ("Sandal", 0.999)}, model="m0")  # another model's tags
    _listing(db, "g", {"category": ("Sandal", 0.999)}, status="failed")
    labels = confident_labels(db, fmnist_taxonomy, "m1", limit=2, min_confidence=0.9)
    assert {(lab.listing_id, lab.group, lab.value) for lab in labels} == {
        ("a", "category", "Bag"), ("a", "colour", "red"), ("b", "category", "Shirt")}
    names = fmnist_taxonomy.category_names
    assert {lab.index for lab in labels if lab.group == "category"} == {names.index("Bag"), names.index("Shirt")}
    assert labels[0].images == ["/a.png"]
    assert confident_labels(db, fmnist_taxonomy, "m1", limit=0, min_confidence=0.9) == []


class _Trained(Exception):
    pass


@pytest.mark.parametrize("replay", [3, 0])
def test_a_retraining_job_replays_the_active_models_surest_listings(db, pg_url, tmp_path, tiny_model_dir, replay):
    from model.registry import promote, register_candidate
    from training import jobs

    db.execute("TRUNCATE training_jobs, model_events, models CASCADE")
    register_candidate(db, tiny_model_dir)
    promote(db, "tiny-test")
    red = {}
    for n in range(5):  # the red channel names each listing in the rows train() receives
        lid, red[f"sure-{n}"] = f"sure-{n}", 100 + n
        Image.new("RGB", (32, 32), (100 + n, 50, 50)).save(tmp_path / f"{lid}.png")
        _listing(db, lid, {"category": ("Bag", 0.99 - n / 100)}, model="tiny-test", photo=tmp_path / f"{lid}.png")
    Image.new("RGB", (32, 32), (7, 50, 50)).save(tmp_path / "fixed.png")
    _listing(db, "fixed", {"category": ("Bag", 0.3)}, model="tiny-test", photo=tmp_path / "fixed.png")
    _correct(db, "fixed")
    seen = {}

    def fake_train(cfg, extra, progress, replay=None):
        seen.update(extra=extra, replay=replay, repeats=cfg.correction_repeats)
        raise _Trained

    settings = Settings(data_dir=tmp_path / "data", retrain_preset="tiny", device="cpu", allow_local_paths=True,
                        corrections_holdout=0, retrain_replay=replay)
    job_id = jobs.create_job(db, trigger="admin", requested_by="ops", reason="replay")
    with pytest.raises(_Trained):
        jobs.run_job(pg_url, job_id, settings, train_model=fake_train)
    assert [int(r) for r in np.asarray(seen["extra"].images)[:, 0, 0, 0]] == [7]  # the correction
    if replay:  # the three surest, labelled with the model's tags
        assert sorted(int(r) for r in np.asarray(seen["replay"].images)[:, 0, 0, 0]) == [100, 101, 102]
        assert set(seen["replay"].category) == {fmnist_names().index("Bag")}
        assert jobs.get_job(db, job_id)["progress"]["replayed"] == 3
    else:
        assert seen["replay"] is None


def fmnist_names() -> list[str]:
    from schemas.taxonomy import load_taxonomy
    return load_taxonomy("fashion-mnist").category_names
