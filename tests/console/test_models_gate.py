"""The models page and the gate: a refused promotion is recorded and shown (each version's last verdict, the
selected one's verdicts and lineage, a link to the job that trained it); an admin un-rejects with a reason;
the console, `enrich promote` and a retraining job reach the same verdict on the same figures."""
from __future__ import annotations

import pytest
from kombu import Connection
from typer.testing import CliRunner

from core.celery_app import configure
from core.config import Settings
from enrich.cli import app
from harness.models import save_small_model
from model.registry import get_model, promote, register_candidate
from tests.console.conftest import sign_in
from tests.training.gate_models import best_category, biased_copy
from training import gate, jobs
from training.train import train_tiny

SET_A = "fmnist-shop:fashion-mnist:test:aaaa"


@pytest.fixture(autouse=True)
def _isolated(db):
    """Empty queues in the console's redis db 6 before and after; the Celery app left as other tests expect."""
    def drop():
        with Connection("redis://127.0.0.1:6379/6") as conn:
            conn.default_channel.client.delete("backfill", "train")

    drop()
    yield
    drop()
    configure(Settings())


def _register(db, src, dest, version, metrics, eval_set=SET_A, **bias):
    register_candidate(db, biased_copy(src, dest / version, version, metrics=metrics, eval_set=eval_set, **bias),
                       actor="trainer", reason=f"seeded {version}")


def _events(db, version):
    return db.execute("SELECT action, actor, reason, details FROM model_events WHERE model_version = %s ORDER BY id",
                      (version,)).fetchall()


def test_a_refused_promotion_is_recorded_and_shown_then_an_admin_unrejects(browser, console_url, db, tmp_path):
    small = save_small_model(tmp_path / "small", "small", seed=0)
    shirts = {f"test/class_recall/{n}": 0.8 for n in ("Shirt", "Bag")}
    _register(db, small, tmp_path, "m-a", {"test/top1": 0.80, **shirts})
    assert promote(db, "m-a", actor="seed").promoted
    _register(db, small, tmp_path, "m-b", {"test/top1": 0.85, **shirts, "test/class_recall/Shirt": 0.6})
    job = db.execute("INSERT INTO training_jobs (status, trigger, requested_by, reason, model_version, outcome)"
                     " VALUES ('done', 'admin', 'alice', 'weekly', 'm-b', 'waiting') RETURNING id").fetchone()[0]

    page = sign_in(browser, console_url, "admin")
    page.goto(f"{console_url}/models?version=m-b")
    assert "would refuse it" in page.inner_text("#selected")  # the same gate, on the stored figures
    assert page.get_attribute("tr[data-version='m-b'] a.job-link", "href") == "/models?version=m-b#training"
    assert page.locator(f"#jobs #job-{job}").count() == 1  # and the job is in the jobs list, linked from there
    assert page.get_attribute("#training-job a", "href") == f"#job-{job}"
    assert f"job #{job}" in page.inner_text("#lineage")
    page.fill("#promote-form input[name=reason]", "better top-1")
    page.click("#promote-form button")
    page.click("#promote-confirm .confirm-yes")
    flash = page.wait_for_selector("#flash").inner_text()
    assert "The gate refused m-b against the active m-a; it is marked rejected" in flash
    assert "category Shirt: recall 0.6000 against the active model's 0.8000" in flash
    assert get_model(db, "m-b").status == "rejected"
    action, actor, reason, details = _events(db, "m-b")[-1]
    assert (action, actor, reason, details["gate"]["outcome"]) == ("reject", "admin", "better top-1", "fail")
    # the versions table says why, and the selected version's verdicts are spelled out
    assert "fail: category Shirt: recall 0.6000" in page.inner_text("tr[data-version='m-b'] .gate-last")
    verdicts = page.inner_text("#verdicts")
    assert "reject by admin (better top-1)" in verdicts and "category Shirt: recall 0.6000 vs 0.8000" in verdicts

    # a reviewer cannot un-reject; an admin can, with a reason, and it is recorded
    reviewer = sign_in(browser, console_url, "reviewer")
    reviewer.goto(f"{console_url}/models?version=m-b")
    assert reviewer.locator("#unreject-form").count() == 0
    token = reviewer.locator('meta[name="csrf-token"]').get_attribute("content")
    res = reviewer.request.post(f"{console_url}/models/m-b/unreject", form={"csrf": token, "reason": "let me"})
    assert res.status == 403 and get_model(db, "m-b").status == "rejected"
    page.fill("#unreject-form input[name=reason]", "the Shirt photos were mislabelled")
    page.click("#unreject-form button")
    assert "m-b is a candidate again" in page.wait_for_selector("#flash").inner_text()
    assert get_model(db, "m-b").status == "candidate"
    assert _events(db, "m-b")[-1][:3] == ("unreject", "admin", "the Shirt photos were mislabelled")
    logged = db.execute("SELECT details FROM console_actions WHERE user_name = 'admin' AND action = 'unreject'"
                        " ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert logged == {"version": "m-b", "reason": "the Shirt photos were mislabelled"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, fmnist_dir):
    return train_tiny(tmp_path_factory.mktemp("tiny"), fmnist_dir)


def test_the_console_the_cli_and_a_job_reach_the_same_verdict(browser, console_url, db, pg_url, tiny, fmnist_dir,
                                                             tmp_path, monkeypatch):
    """One candidate's weights under three names, against one active model: figures measured once and stored
    for the console and `enrich promote`, measured again by the retraining job. Same figures, one gate: the
    same verdict, recorded three times."""
    index, _ = best_category(tiny)
    worse = biased_copy(tiny, tmp_path / "worse", "worse", category=index, shift=-100.0)
    measured = gate.measure(worse, tiny, device="cpu")
    fresh = {"worse": measured.metrics["worse"], "tiny-test": measured.metrics["tiny-test"]}
    _register(db, tiny, tmp_path, "base", fresh["tiny-test"], eval_set=measured.eval_set)
    assert promote(db, "base", actor="seed").promoted
    for name in ("via-console", "via-cli"):
        _register(db, worse, tmp_path, name, fresh["worse"], eval_set=measured.eval_set)

    page = sign_in(browser, console_url, "admin")
    page.goto(f"{console_url}/models?version=via-console")
    page.fill("#promote-form input[name=reason]", "same figures")
    page.click("#promote-form button")
    page.click("#promote-confirm .confirm-yes")
    page.wait_for_selector("#flash")
    monkeypatch.setenv("ENRICH_DATA_DIR", str(tmp_path / "data"))
    res = CliRunner().invoke(app, ["promote", "via-cli", "--no-backfill", "--database-url", pg_url])
    assert res.exit_code == 1, res.output
    job_id = jobs.create_job(db, trigger="admin", requested_by="alice", reason="same figures")
    settings = Settings(data_dir=tmp_path / "data", retrain_preset="tiny", retrain_data_dir=fmnist_dir,
                        device="cpu", torch_threads=1, auto_promote=True)
    job_copy = biased_copy(worse, tmp_path / "via-job", "via-job")
    out = jobs.run_job(pg_url, job_id, settings, train_model=lambda cfg, extra, progress: job_copy,
                       send_backfill=lambda v: None)
    assert out["outcome"].startswith("rejected by the gate against base")

    verdicts = {}
    for name in ("via-console", "via-cli", "via-job"):
        action, _, _, details = _events(db, name)[-1]
        assert action == "reject", (name, details)
        verdicts[name] = details["gate"]
    assert verdicts["via-job"]["measured"] == "re-measured" and verdicts["via-cli"]["measured"] == "stored"
    same = ("outcome", "active", "reasons", "notes", "metrics", "groups", "classes", "eval_sets", "tolerance")
    for name in ("via-cli", "via-job"):
        assert {k: verdicts[name][k] for k in same} == {k: verdicts["via-console"][k] for k in same}, name
