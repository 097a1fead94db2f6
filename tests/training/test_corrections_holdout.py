"""Corrections as evaluation: a stable hash share of corrected listings is held out of retraining
(training.corrections.is_held_out, ENRICH_CORRECTIONS_HOLDOUT), ``correction_labels`` selects either side, a
retraining job trains on the rest only, and the gate reports both models on the held-out side per group."""
from __future__ import annotations

import hashlib
import json
from itertools import count, islice

import numpy as np
import pytest
from PIL import Image

from core.config import Settings
from training.corrections import correction_labels, is_held_out

SHARE = 0.2


def _ids(n: int, held: bool, prefix: str = "lst") -> list[str]:
    """The first n listing ids on one side of the split at SHARE."""
    return list(islice((f"{prefix}-{i}" for i in count() if is_held_out(f"{prefix}-{i}", SHARE) == held), n))


def _correct(db, listing_id: str, group: str, value: str, photo=None) -> None:
    if photo is not None:
        db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash) VALUES (%s, 's', %s, 'h')"
                   " ON CONFLICT DO NOTHING", (listing_id, json.dumps({"images": [str(photo)]})))
    db.execute("INSERT INTO corrections (event_id, listing_id, tag_group, new_value, corrected_by, corrected_at)"
               " VALUES (%s, %s, %s, %s, 'reviewer', now())",
               (f"e-{listing_id}-{group}-{value}", listing_id, group, value))


# ---- the split ----------------------------------------------------------------------------------------

def test_the_hash_split_is_stable_near_the_share_and_grows_with_it():
    ids = [f"listing-{i}" for i in range(10_000)]
    held = [lid for lid in ids if is_held_out(lid, SHARE)]
    assert abs(len(held) / len(ids) - SHARE) < 0.015
    assert held == [lid for lid in ids if is_held_out(lid, SHARE)]  # the same ids every time
    # the definition: the first 8 hex digits of sha256("holdout:" + id) as a fraction of 16**8
    expected = [lid for lid in ids
                if int(hashlib.sha256(f"holdout:{lid}".encode()).hexdigest()[:8], 16) / 16 ** 8 < SHARE]
    assert held == expected
    smaller = {lid for lid in ids if is_held_out(lid, 0.1)}
    assert smaller < set(held)  # a larger share only adds listings
    assert not any(is_held_out(lid, 0.0) for lid in ids)  # 0: off


def test_the_setting_defaults_to_a_fifth_and_zero_turns_it_off():
    assert Settings().corrections_holdout == SHARE
    assert Settings(corrections_holdout=0).corrections_holdout == 0.0
    with pytest.raises(ValueError):
        Settings(corrections_holdout=1.0)  # nothing left to train on


def test_train_and_eval_partition_the_corrections_by_listing(db, fmnist_taxonomy):
    for i in range(40):
        _correct(db, f"lst-{i}", "category", "Bag")
        _correct(db, f"lst-{i}", "colour", "red")
    _correct(db, "lst-0", "colour", "no-such-colour")  # dropped by the taxonomy on every side
    every = correction_labels(db, fmnist_taxonomy)
    train = correction_labels(db, fmnist_taxonomy, holdout="train", share=SHARE)
    held = correction_labels(db, fmnist_taxonomy, holdout="eval", share=SHARE)
    key = lambda labels: {(lab.listing_id, lab.group) for lab in labels}  # noqa: E731
    assert train and held and len(train) + len(held) == len(every) == 79
    assert key(train) | key(held) == key(every) and not key(train) & key(held)
    assert {lab.listing_id for lab in held} == {f"lst-{i}" for i in range(40) if is_held_out(f"lst-{i}", SHARE)}
    # all of a listing's groups on one side
    assert not {lab.listing_id for lab in train} & {lab.listing_id for lab in held}
    # share 0: everything trains, nothing is held out; no selector: everything
    assert key(correction_labels(db, fmnist_taxonomy, holdout="train", share=0.0)) == key(every)
    assert correction_labels(db, fmnist_taxonomy, holdout="eval", share=0.0) == []
    with pytest.raises(ValueError, match="holdout must be one of"):
        correction_labels(db, fmnist_taxonomy, holdout="test", share=SHARE)


# ---- a retraining job never trains on the held-out listings -------------------------------------------

class _Trained(Exception):
    """Raised by the stand-in trainer once it has seen what it was given."""


def test_a_retraining_jobs_training_rows_exclude_held_out_listings(db, pg_url, tmp_path):
    from training import jobs

    db.execute("TRUNCATE training_jobs, model_events CASCADE")
    colour = {}  # listing -> its photo's red channel, which names it in the rows train() receives
    for n, lid in enumerate(_ids(12, held=False) + _ids(6, held=True)):
        colour[lid] = 10 + 10 * n
        photo = tmp_path / f"{lid}.png"
        Image.new("RGB", (40, 40), (colour[lid], 60, 140)).save(photo)
        _correct(db, lid, "category", "Shirt", photo)
    received = []

    def fake_train(cfg, extra, progress, settings=None):
        received.append(extra)
        raise _Trained

    settings = Settings(data_dir=tmp_path / "data", retrain_preset="tiny", device="cpu", allow_local_paths=True)
    job_id = jobs.create_job(db, trigger="admin", requested_by="ops", reason="holdout")
    with pytest.raises(_Trained):
        jobs.run_job(pg_url, job_id, settings, train_model=fake_train)
    (extra,) = received
    trained = {int(r) for r in np.asarray(extra.images)[:, 0, 0, 0]}
    assert trained == {colour[lid] for lid in _ids(12, held=False)}
    progress = jobs.get_job(db, job_id)["progress"]
    assert (progress["corrections"], progress["correction_rows"], progress["held_out"]) == (12, 12, 6)


# ---- the gate, per group -------------------------------------------------------------------------------

def _biased(src, dest, version: str, bag_shift: float, red_shift: float, metrics: dict):
    """A copy of ``src`` pushed towards (+) or away from (-) category "Bag" and colour "red"."""
    from safetensors.torch import load_file, save_file

    from model.manifest import file_sha256
    from schemas.taxonomy import load_taxonomy
    from tests.training.gate_models import biased_copy

    taxonomy = load_taxonomy("fashion-mnist")
    out = biased_copy(src, dest, version, category=taxonomy.category_names.index("Bag"), shift=bag_shift,
                      metrics=metrics, eval_set="fmnist-shop:fashion-mnist:test:aaaa")
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    state["group_heads.colour.bias"][taxonomy.group("colour").values.index("red")] += red_shift
    save_file(state, str(weights), metadata={"model_version": version})
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["weights_sha256"] = file_sha256(weights)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_the_gate_reports_each_group_a_pooled_figure_hides(db, tmp_path):
    """The active model says "Bag" to everything and never "red"; the candidate the reverse. People corrected
    held-out listings to Bag and red: pooled, both are right on half (the gate passes), per group the candidate
    wins colour and loses category outright. Corrections on listings retraining learns from are not counted."""
    from harness.models import save_small_model
    from model.registry import promote as activate
    from model.registry import register_candidate
    from training import gate

    small = save_small_model(tmp_path / "small", "small", seed=0)
    figures = {"test/top1": 0.8}
    register_candidate(db, _biased(small, tmp_path / "m-a", "m-a", 100.0, -100.0, figures), actor="t", reason="")
    assert activate(db, "m-a", actor="seed", reason="first").promoted
    register_candidate(db, _biased(small, tmp_path / "m-b", "m-b", -100.0, 100.0, figures), actor="t", reason="")
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (90, 120, 200)).save(photo)
    for lid in _ids(12, held=True):
        _correct(db, lid, "category", "Bag", photo)
        _correct(db, lid, "colour", "red", photo)
    for lid in _ids(30, held=False):  # the candidate would be all wrong on these: they must not count
        _correct(db, lid, "category", "Bag", photo)

    settings = Settings(data_dir=tmp_path / "data", allow_local_paths=True, device="cpu")
    d = gate.promote(db, "m-b", settings, actor="alice", activate=False)
    verdict = d.details["gate"]
    held = verdict["held_out"]
    assert verdict["outcome"] == "pass" and d.reasons == []
    assert (held["labels"], held["candidate"], held["active"], held["delta"], held["share"]) == (24, 0.5, 0.5, 0.0,
                                                                                               SHARE)
    assert held["groups"] == {"category": {"labels": 12, "candidate": 0.0, "active": 1.0, "delta": -1.0},
                              "colour": {"labels": 12, "candidate": 1.0, "active": 0.0, "delta": 1.0}}
    lines = {"held-out corrections category: 0.0% vs 100.0% (-100.0) on 12 labels",
             "held-out corrections colour: 100.0% vs 0.0% (+100.0) on 12 labels"}
    assert lines <= set(verdict["notes"])
    # what `enrich models show` and the console's verdict list print: each line once, beside the pooled one
    shown = gate.explain(verdict)
    at = shown.index("held-out corrections (24): candidate 50.0%, active 50.0%")
    assert set(shown[at + 1:at + 3]) == lines and sum(line.endswith("on 12 labels") for line in shown) == 2


def test_with_the_holdout_off_the_gate_says_the_corrections_were_trainable(db, tmp_path):
    """ENRICH_CORRECTIONS_HOLDOUT=0: every correction since the active model's training counts, with a note."""
    from harness.models import save_small_model
    from model.registry import promote as activate
    from model.registry import register_candidate
    from training import gate

    small = save_small_model(tmp_path / "small", "small", seed=0)
    register_candidate(db, _biased(small, tmp_path / "m-a", "m-a", 100.0, 0.0, {"test/top1": 0.8}), actor="t",
                       reason="")
    assert activate(db, "m-a", actor="seed", reason="first").promoted
    register_candidate(db, _biased(small, tmp_path / "m-b", "m-b", 100.0, 0.0, {"test/top1": 0.8}), actor="t",
                       reason="")
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (90, 120, 200)).save(photo)
    for lid in _ids(25, held=False):
        _correct(db, lid, "category", "Bag", photo)
    settings = Settings(data_dir=tmp_path / "data", allow_local_paths=True, device="cpu", corrections_holdout=0)
    verdict = gate.promote(db, "m-b", settings, actor="alice", activate=False).details["gate"]
    assert verdict["held_out"]["labels"] == 25 and verdict["held_out"]["groups"]["category"]["candidate"] == 1.0
    assert any("ENRICH_CORRECTIONS_HOLDOUT is 0" in n for n in verdict["notes"])
