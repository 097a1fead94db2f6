"""`enrich train / evaluate / promote` through the real CLI app."""
import json
import shutil

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.integration


def test_promote_cli_gates_on_metrics(db, pg_url, tiny_model_dir, tmp_path):
    from enrich.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["promote", str(tiny_model_dir), "--no-backfill", "--database-url", pg_url])
    assert res.exit_code == 0, res.output
    assert "promoted tiny-test" in res.output
    # a copy with worse stored metrics is registered and rejected; the active model stays
    worse = tmp_path / "worse"
    shutil.copytree(tiny_model_dir, worse)
    manifest = json.loads((worse / "manifest.json").read_text())
    manifest["model_version"] = "tiny-worse"
    manifest["metrics"]["test/top1"] -= 0.05  # same evaluation set (eval/* unchanged), worse top-1
    (worse / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(app, ["promote", str(worse), "--no-backfill", "--database-url", pg_url])
    assert res.exit_code == 1 and "rejected tiny-worse" in res.output and "test/top1" in res.output
    assert db.execute("SELECT model_version FROM models WHERE status = 'active'").fetchall() == [("tiny-test",)]


def test_evaluate_cli_reports_metrics(tiny_model_dir, fmnist_dir, tmp_path):
    from enrich.cli import app

    out = tmp_path / "m.json"
    res = CliRunner().invoke(app, ["evaluate", str(tiny_model_dir), "--data-dir", str(fmnist_dir),
                                   "--test-items", "200", "--device", "cpu", "--output", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(out.read_text())
    assert 0.0 <= metrics["test/top1"] <= 1.0 and "test/recall@1" in metrics and "test_plain/top1" in metrics
    fp32 = tmp_path / "fp32.json"
    res = CliRunner().invoke(app, ["evaluate", str(tiny_model_dir), "--data-dir", str(fmnist_dir),
                                   "--test-items", "200", "--device", "cpu", "--fp32", "--output", str(fp32)])
    assert res.exit_code == 0, res.output
    assert abs(json.loads(fp32.read_text())["test/top1"] - metrics["test/top1"]) <= 0.05  # 600 photos


def test_train_cli_rejects_unknown_preset():
    from enrich.cli import app

    res = CliRunner().invoke(app, ["train", "--preset", "huge"])
    assert res.exit_code != 0 and "unknown preset" in res.output


def test_train_cli_rejects_unknown_augmentation_before_any_work(tmp_path):
    from enrich.cli import app

    res = CliRunner().invoke(app, ["train", "--preset", "tiny", "--augment", "heavy", "--out-dir", str(tmp_path)])
    assert res.exit_code != 0 and "unknown augmentation 'heavy'" in res.output
    assert not any(tmp_path.iterdir())  # nothing trained or written


def test_flip_tta_is_refused_for_a_model_trained_without_flips(tmp_path):
    from enrich.cli import app

    res = CliRunner().invoke(app, ["train", "--preset", "tiny", "--augment", "none", "--flip-tta",
                                   "--out-dir", str(tmp_path)])
    assert res.exit_code != 0 and "flip_tta needs a model trained with flips" in str(res.exception)
    assert not any(tmp_path.iterdir())


def test_promote_cli_records_who_and_why_and_starts_the_backfill(db, pg_url, tiny_model_dir, tmp_path, monkeypatch):
    from kombu import Connection

    from core.celery_app import configure, queue_depth
    from core.config import Settings
    from enrich.cli import app
    from model.registry import history

    broker = "redis://127.0.0.1:6379/3"  # a database of its own: the backfill queue name is fixed
    monkeypatch.setenv("ENRICH_CELERY_BROKER_URL", broker)
    monkeypatch.setenv("ENRICH_DATA_DIR", str(tmp_path / "data"))
    with Connection(broker) as conn:
        conn.default_channel.client.flushdb()
    try:
        res = CliRunner().invoke(app, ["promote", str(tiny_model_dir), "--reason", "first model", "--by", "alice",
                                       "--database-url", pg_url])
        assert res.exit_code == 0, res.output
        assert "backfill of tiny-test enqueued" in res.output
        assert queue_depth("backfill") == 1
        move = history(db)[0]
        assert (move.action, move.model_version, move.actor, move.reason) == \
            ("promote", "tiny-test", "alice", "first model")
    finally:
        with Connection(broker) as conn:
            conn.default_channel.client.flushdb()
        configure(Settings())
