"""Registry lifecycle on real Postgres: artifacts stored by version and hash, the alias and its history, rollback."""
from __future__ import annotations

import boto3
import pytest
from typer.testing import CliRunner

from core.config import Settings
from enrich.cli import app
from model.artifacts import ArtifactStore, store_from_settings
from model.checkpoint import save_model
from model.manifest import ModelMismatchError
from model.network import build_model
from model.registry import (
    active_model,
    get_model,
    history,
    local_dir,
    model_dir_for,
    promote,
    register_candidate,
    rollback,
)
from schemas.taxonomy import load_taxonomy
from training import gate


def _model_dir(tmp_path, version, top1, eval_set=""):
    model = build_model("small_cnn", load_taxonomy("fashion-mnist"), pretrained=False, embedding_dim=16)
    save_model(model, tmp_path / version, model_version=version, image_size=28, metrics={"test/top1": top1},
               eval_set=eval_set)
    return tmp_path / version


def _store(tmp_path) -> ArtifactStore:
    return store_from_settings(Settings(data_dir=tmp_path / "data"))


def test_registered_files_are_stored_by_version_and_hash_and_verified(db, tmp_path):
    store = _store(tmp_path)
    row = register_candidate(db, _model_dir(tmp_path, "m-a", 0.9), store, actor="alice", reason="first")
    assert row.artifact_uri.endswith(f"m-a/{row.sha256}") and row.registered_by == "alice"
    stored = local_dir(row, store)
    assert (stored / "model.safetensors").is_file() and (stored / "manifest.json").is_file()
    assert model_dir_for(db, version="m-a", store=store) == stored
    (stored / "model.safetensors").write_bytes(b"\0" * 64)  # replaced behind the registry's back
    with pytest.raises(ModelMismatchError, match="sha256"):
        local_dir(row, store)


def test_s3_artifact_store_round_trip(db, tmp_path, s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="models")
    store = ArtifactStore("s3://models/registry", tmp_path / "cache", client)
    row = register_candidate(db, _model_dir(tmp_path, "m-s3", 0.9), store)
    assert row.artifact_uri.startswith("s3://models/registry/m-s3/")
    other_machine = ArtifactStore("s3://models/registry", tmp_path / "elsewhere", client)
    got = local_dir(get_model(db, "m-s3"), other_machine)
    assert got.is_relative_to(tmp_path / "elsewhere") and (got / "model.safetensors").is_file()


def test_rollback_moves_the_alias_back_without_a_gate_and_keeps_history(db, tmp_path):
    for version, top1 in (("m-a", 0.90), ("m-b", 0.95)):
        register_candidate(db, _model_dir(tmp_path, version, top1))
    assert promote(db, "m-a", actor="alice", reason="first").promoted
    assert promote(db, "m-b", actor="bob", reason="better").promoted
    d = rollback(db, actor="carol", reason="shelves look wrong")  # m-a would fail the gate against m-b
    assert d.promoted and (d.candidate, d.previous) == ("m-a", "m-b")
    assert active_model(db).model_version == "m-a" and get_model(db, "m-b").status == "retired"
    moves = [(m.action, m.model_version, m.previous, m.actor) for m in history(db)]
    assert moves[:3] == [("rollback", "m-a", "m-b", "carol"), ("promote", "m-b", "m-a", "bob"),
                         ("promote", "m-a", None, "alice")]
    assert rollback(db, "m-b", actor="carol", reason="fixed").promoted  # and forward again
    assert active_model(db).model_version == "m-b"


def test_rollback_refuses_a_version_that_was_never_active(db, tmp_path):
    register_candidate(db, _model_dir(tmp_path, "m-a", 0.9))
    with pytest.raises(LookupError, match="replaced none"):
        rollback(db, actor="x", reason="y")
    promote(db, "m-a")
    register_candidate(db, _model_dir(tmp_path, "m-new", 0.5))
    with pytest.raises(PermissionError, match="never active"):
        rollback(db, "m-new", actor="x", reason="skip the gate")
    assert active_model(db).model_version == "m-a"


def test_rollback_and_models_commands(db, pg_url, tmp_path):
    for version, top1 in (("m-a", 0.90), ("m-b", 0.95)):
        register_candidate(db, _model_dir(tmp_path, version, top1), actor="alice", reason="weekly")
        promote(db, version, actor="alice", reason="weekly")
    res = CliRunner().invoke(app, ["rollback", "--reason", "bad shelves", "--by", "carol", "--no-backfill",
                                   "--database-url", pg_url])
    assert res.exit_code == 0, res.output
    assert "m-a is active again (was m-b)" in res.output
    db.execute("INSERT INTO training_jobs (status, trigger, requested_by, reason, progress) VALUES"
               " ('running', 'admin', 'dana', 'new corrections', '{\"stage\": \"2-classification\", \"step\": 120,"
               " \"of\": 4800}')")
    listed = CliRunner().invoke(app, ["models", "--database-url", pg_url], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert "bad shelves" in listed.output and "carol" in listed.output and "(was active)" in listed.output
    assert "running (admin, dana: new corrections) 2-classification step 120/4800" in listed.output
    never = CliRunner().invoke(app, ["rollback", "nope", "--reason", "x", "--no-backfill", "--database-url", pg_url])
    assert never.exit_code == 2 and "not registered" in never.output


def test_gate_refuses_figures_from_another_evaluation_set_without_rejecting(db, tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    register_candidate(db, _model_dir(tmp_path, "m-a", 0.90, eval_set="fmnist-shop:fashion-mnist:test:aaaa"))
    promote(db, "m-a")
    register_candidate(db, _model_dir(tmp_path, "m-b", 0.99, eval_set="fmnist-shop:fashion-mnist:test:bbbb"))
    d = gate.promote(db, "m-b", settings, actor="cli")
    assert not d.promoted and "different evaluation sets" in d.reasons[0]
    assert get_model(db, "m-b").status == "candidate"  # not worse, only not comparable: re-measure it
    register_candidate(db, _model_dir(tmp_path, "m-c", 0.99, eval_set="fmnist-shop:fashion-mnist:test:aaaa"))
    assert gate.promote(db, "m-c", settings, actor="cli").promoted
