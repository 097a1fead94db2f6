"""A retraining job goes through the same gate: its failing candidate ends rejected with the reasons, stored
with the event and shown by `enrich models`; the model it trains records its lineage (the job, the model it
started from, the corrections it learnt, the data), which `enrich models show V` prints with its verdicts."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from core.config import Settings
from enrich.cli import app
from model.manifest import read_manifest
from model.registry import active_version, get_model, promote, register_candidate
from tests.training.gate_models import best_category, biased_copy
from training import jobs
from training.fmnist import load_fashion_mnist

pytestmark = pytest.mark.integration


def _settings(tmp_path, fmnist_dir, **overrides) -> Settings:
    return Settings(data_dir=tmp_path / "data", retrain_preset="tiny", retrain_data_dir=fmnist_dir, device="cpu",
                    torch_threads=1, allow_local_paths=True, **overrides)


def _active(db, tiny_model_dir) -> None:
    register_candidate(db, tiny_model_dir, actor="seed", reason="the model in service")
    assert promote(db, "tiny-test", actor="seed").promoted


def test_a_retraining_jobs_failing_candidate_ends_rejected_with_its_reasons(db, pg_url, tiny_model_dir, fmnist_dir,
                                                                           tmp_path):
    """The job's candidate never predicts the category the active model recalls best: the gate (both measured
    on the fixed set) rejects it, and says why, in the job's outcome, the event and `enrich models`."""
    _active(db, tiny_model_dir)
    index, name = best_category(tiny_model_dir)
    worse = biased_copy(tiny_model_dir, tmp_path / "worse", "tiny-worse", category=index, shift=-100.0)
    sent: list[str] = []
    job_id = jobs.create_job(db, trigger="admin", requested_by="alice", reason="new photos")
    out = jobs.run_job(pg_url, job_id, _settings(tmp_path, fmnist_dir, auto_promote=True),
                       train_model=lambda cfg, extra, progress: worse, send_backfill=sent.append)
    assert out["status"] == "done" and out["model_version"] == "tiny-worse"
    assert out["outcome"].startswith("rejected by the gate against tiny-test (an admin may reconsider it: enrich "
                                     "models unreject tiny-worse --reason …): ")
    assert f"category {name}: recall 0.0000 against the active model's" in out["outcome"]
    assert get_model(db, "tiny-worse").status == "rejected" and active_version(db) == "tiny-test" and not sent

    action, actor, reason, details = db.execute(
        "SELECT action, actor, reason, details FROM model_events WHERE model_version = 'tiny-worse'"
        " ORDER BY id DESC LIMIT 1").fetchone()
    assert (action, actor, reason) == ("reject", "alice", f"retraining job #{job_id}: new photos")
    gate = details["gate"]
    assert gate["outcome"] == "fail" and gate["measured"] == "re-measured" and gate["active"] == "tiny-test"
    assert gate["eval_sets"]["candidate"] == gate["eval_sets"]["active"] == tiny_eval_set(tiny_model_dir)
    shelf = gate["classes"][name]
    assert shelf["candidate"] == 0.0 and shelf["active"] > 0.1 and shelf["ok"] is False
    assert "test/top1" in gate["metrics"] and gate["groups"]  # the overall and per-group deltas are kept

    listed = CliRunner().invoke(app, ["models", "--database-url", pg_url], env={"COLUMNS": "400"})
    assert listed.exit_code == 0, listed.output
    line = next(ln for ln in listed.output.splitlines() if "tiny-worse" in ln)
    assert "rejected" in line and "fail: " in line  # the list starts the reasons; `models show` has them all
    shown = CliRunner().invoke(app, ["models", "show", "tiny-worse", "--database-url", pg_url], env={"COLUMNS": "400"})
    assert shown.exit_code == 0, shown.output
    assert f"category {name}: recall 0.0000" in shown.output


def tiny_eval_set(model_dir) -> str:
    return read_manifest(model_dir).eval_set


def _corrections(db, fmnist_dir, tmp_path) -> int:
    """Two listings of real test photos whose category people corrected."""
    x, y = load_fashion_mnist(fmnist_dir, "test")
    for truth, label in ((6, "Shirt"), (0, "T-shirt/top")):
        i = int(np.flatnonzero(y == truth)[0])
        lid = f"lineage-{truth}"
        path = tmp_path / f"{lid}.png"
        Image.fromarray(x[i]).convert("RGB").resize((56, 56)).save(path)
        db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash) VALUES (%s, 's', %s, 'h')",
                   (lid, json.dumps({"images": [str(path)]})))
        db.execute("INSERT INTO corrections (event_id, listing_id, tag_group, new_value, corrected_by, corrected_at)"
                   " VALUES (%s, %s, 'category', %s, 'reviewer', now())", (f"e-{lid}", lid, label))
    return 2


def test_lineage_is_recorded_by_a_job_and_shown_by_models_show(db, pg_url, tiny_model_dir, fmnist_dir, tmp_path):
    _active(db, tiny_model_dir)
    n = _corrections(db, fmnist_dir, tmp_path)
    job_id = jobs.create_job(db, trigger="admin", requested_by="alice", reason="lineage")
    out = jobs.run_job(pg_url, job_id, _settings(tmp_path, fmnist_dir, corrections_holdout=0),  # all train
                       send_backfill=lambda v: None)
    assert out["status"] == "done", out["outcome"]
    version = out["model_version"]
    row = get_model(db, version)
    lineage = row.lineage
    assert lineage["job"] == job_id and lineage["started_from"] == "tiny-test"  # warm start from the active
    assert lineage["corrections"] == n and lineage["extra_rows"] == n and len(lineage["corrections_sha256"]) == 64
    assert lineage["started_at"] and lineage["corrections_through"]
    assert row.data_fingerprint and row.eval_set == tiny_eval_set(tiny_model_dir)

    res = CliRunner().invoke(app, ["models", "show", version, "--database-url", pg_url])
    assert res.exit_code == 0, res.output
    text = res.output
    assert f"job: #{job_id}" in text and "started from: tiny-test" in text
    assert f"corrections: {n} (through " in text and lineage["corrections_sha256"][:16] in text
    assert f"evaluation set {row.eval_set}" in text
    assert f"  test/top1  {row.metrics['test/top1']:.4f}" in text  # its metrics
    assert "gate verdicts:" in text and "against tiny-test (re-measured figures" in text
    assert "note: not enough held-out corrections: 2 corrected label(s)" in text
    missing = CliRunner().invoke(app, ["models", "show", "nope", "--database-url", pg_url])
    assert missing.exit_code == 2 and "not registered" in missing.output
