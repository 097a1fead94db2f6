"""The models page through Chromium and plain HTTP against the served console: promote through the gate (and the
gate's refusal), roll back, retrain, reviewers refused, metrics side by side, report plots served safely."""
from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest
from kombu import Connection
from playwright.sync_api import expect

from core.celery_app import configure
from core.config import Settings
from harness.net import free_port
from model.checkpoint import save_model
from model.network import build_model
from model.registry import active_model, get_model, history, promote, register_candidate
from schemas.taxonomy import load_taxonomy
from tests.console.conftest import sign_in
from training.report import plot_bars, plot_losses

BROKER_DB6 = "redis://127.0.0.1:6379/6"  # the console fixture's broker; no worker listens on it
QUEUES = ("backfill", "train")  # what the page's buttons enqueue there


@pytest.fixture()
def console_settings(console_settings, request):
    """The shared settings; `indirect` parametrisation with "broker-down" points the broker at a closed port."""
    if getattr(request, "param", None) == "broker-down":
        return console_settings.model_copy(update={"celery_broker_url": f"redis://127.0.0.1:{free_port()}/6"})
    return console_settings


@pytest.fixture(autouse=True)
def _isolated(db):
    """Each test starts with empty queues in redis db 6 (conftest clears the login failures); afterwards what the
    buttons sent there and the audit rows this test wrote are dropped, and the Celery app is left as the other
    tests expect it."""
    def drop():
        with Connection(BROKER_DB6) as conn:
            conn.default_channel.client.delete(*QUEUES)

    drop()
    before = db.execute("SELECT coalesce(max(id), 0) FROM console_actions").fetchone()[0]
    yield
    drop()
    db.execute("DELETE FROM console_actions WHERE id > %s", (before,))
    configure(Settings())


def _model(db, tmp_path, version, metrics, plots=True):
    """A registered candidate (no artifact store: the row points at the directory), with a training report."""
    out = tmp_path / "models" / version
    model = build_model("small_cnn", load_taxonomy("fashion-mnist"), pretrained=False, embedding_dim=16)
    save_model(model, out, model_version=version, image_size=28, metrics=metrics, eval_set="fmnist-test")
    if plots:
        report = out / "report"
        report.mkdir()
        plot_losses([{"stage": "1-retrieval", "total": 1.0 / (i + 1)} for i in range(40)], report / "loss.png")
        plot_bars({"colour": 0.7, "pattern": 0.5}, f"F1 of {version}", report / "per_label_f1.png")
        (report / "summary.md").write_text("# not a plot\n")
    register_candidate(db, out, actor="trainer", reason=f"seeded {version}")
    return out


def _seed_two(db, tmp_path, candidate_top1=0.95):
    """m-a active (top1 0.90, recall@1 0.80), m-b a candidate."""
    _model(db, tmp_path, "m-a", {"test/top1": 0.90, "test/recall@1": 0.80, "val/loss": 0.31})
    assert promote(db, "m-a", actor="seed", reason="first").promoted
    _model(db, tmp_path, "m-b", {"test/top1": candidate_top1, "test/recall@1": 0.80, "val/loss": 0.27})


def _actions(db, user):
    return [(a, d) for a, d in db.execute("SELECT action, details FROM console_actions WHERE user_name = %s"
                                          " ORDER BY id", (user,)).fetchall()]


def _queue_len(queue: str) -> int:
    with Connection(BROKER_DB6) as conn:
        return conn.default_channel.client.llen(queue)


def test_an_admin_promotes_a_candidate_through_the_page_with_a_required_reason(browser, console_url, db, tmp_path):
    _seed_two(db, tmp_path)
    page = sign_in(browser, console_url, "admin")
    page.goto(f"{console_url}/models?version=m-b")
    form = page.locator("#promote-form")
    form.locator("button").click()  # no reason: the browser does not send the form
    assert form.locator("input[name=reason]").evaluate("e => e.validity.valueMissing")
    assert page.url.endswith("/models?version=m-b") and active_model(db).model_version == "m-a"
    # nor does the server take one without a reason
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    res = page.request.post(f"{console_url}/models/m-b/promote", form={"csrf": token, "reason": "  "})
    assert res.ok and "a reason is required" in res.text()
    assert active_model(db).model_version == "m-a" and get_model(db, "m-b").status == "candidate"

    page.goto(f"{console_url}/models?version=m-b")
    form.locator("input[name=reason]").fill("better top-1 on the fixed set")
    form.locator("button").click()
    page.click("#promote-confirm .confirm-yes")  # the dialog says what changes (test_models_confirm.py)
    page.wait_for_selector("#flash")
    assert "m-b is active (previous: m-a); catalogue backfill enqueued" in page.inner_text("#flash")
    assert active_model(db).model_version == "m-b" and get_model(db, "m-a").status == "retired"
    move = history(db)[0]
    assert (move.action, move.model_version, move.previous, move.actor, move.reason) == \
        ("promote", "m-b", "m-a", "admin", "better top-1 on the fixed set")
    assert _queue_len("backfill") == 1  # the backfill of m-b, as `enrich promote` sends it
    logged = [d for a, d in _actions(db, "admin") if a == "promote"]
    assert logged[-1]["version"] == "m-b" and logged[-1]["promoted"] is True
    assert logged[-1]["backfill"] == "catalogue backfill enqueued"


def test_a_refused_promotion_shows_the_gates_reason(browser, console_url, db, tmp_path):
    _seed_two(db, tmp_path, candidate_top1=0.50)
    page = sign_in(browser, console_url, "admin")
    page.goto(f"{console_url}/models?version=m-b")
    assert "would refuse it" in page.inner_text("#selected")  # the preview on the stored figures
    page.fill("#promote-form input[name=reason]", "try it anyway")
    page.click("#promote-form button")
    page.click("#promote-confirm .confirm-yes")
    flash = page.wait_for_selector("#flash").inner_text()
    assert "The gate refused m-b against the active m-a" in flash
    assert "test/top1: candidate 0.5000 is worse than active 0.9000" in flash
    assert active_model(db).model_version == "m-a" and get_model(db, "m-b").status == "rejected"
    assert _queue_len("backfill") == 0
    logged = [d for a, d in _actions(db, "admin") if a == "promote"][-1]
    assert logged["promoted"] is False and "worse than active" in logged["reasons"][0]


def test_an_admin_rolls_back_through_the_page(browser, console_url, db, tmp_path):
    _seed_two(db, tmp_path)
    assert promote(db, "m-b", actor="seed", reason="better").promoted
    page = sign_in(browser, console_url, "admin")
    page.goto(f"{console_url}/models?version=m-b")
    assert page.locator("#rollback-form").count() == 0  # the active one has nothing to roll back to
    page.goto(f"{console_url}/models?version=m-a")
    page.fill("#rollback-form input[name=reason]", "shelves look wrong")
    page.click("#rollback-form button")
    page.click("#rollback-confirm .confirm-yes")
    assert "m-a is active again (was m-b); catalogue backfill enqueued" in page.wait_for_selector("#flash").inner_text()
    assert active_model(db).model_version == "m-a"
    move = history(db)[0]
    assert (move.action, move.model_version, move.previous, move.actor, move.reason) == \
        ("rollback", "m-a", "m-b", "admin", "shelves look wrong")
    assert _queue_len("backfill") == 1
    assert any(a == "rollback" and d["version"] == "m-a" for a, d in _actions(db, "admin"))


def test_a_reviewers_promote_request_is_refused(browser, console_url, db, tmp_path):
    _seed_two(db, tmp_path)
    moves = len(history(db))
    page = sign_in(browser, console_url, "reviewer")
    page.goto(f"{console_url}/models?version=m-b")
    assert "m-b" in page.inner_text("#selected")  # reviewers see the page …
    for form in ("#promote-form", "#rollback-form", "#shadow-form", "#retrain-form"):
        assert page.locator(form).count() == 0  # … without the buttons
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")  # their own session's valid token
    res = page.request.post(f"{console_url}/models/m-b/promote", form={"csrf": token, "reason": "let me"})
    assert res.status == 403
    assert page.request.post(f"{console_url}/models/m-a/rollback", form={"csrf": token, "reason": "x"}).status == 403
    assert page.request.post(f"{console_url}/models/retrain", form={"csrf": token, "reason": "x"}).status == 403
    assert page.request.post(f"{console_url}/models/m-b/shadow", form={"csrf": token, "reason": "x"}).status == 403
    assert active_model(db).model_version == "m-a" and get_model(db, "m-b").status == "candidate"
    assert len(history(db)) == moves
    assert db.execute("SELECT count(*) FROM training_jobs").fetchone()[0] == 0 and _queue_len("backfill") == 0
    refused = [d["path"] for a, d in _actions(db, "reviewer") if a == "models.refused"]
    assert "/models/m-b/promote" in refused


def test_the_retrain_button_creates_a_training_job_with_the_admin_and_reason(browser, console_url, db, tmp_path):
    _seed_two(db, tmp_path)
    page = sign_in(browser, console_url, "admin")
    page.goto(f"{console_url}/models")
    page.fill("#retrain-form input[name=reason]", "new corrections on shirts")
    page.select_option("#retrain-form select[name=preset]", "tiny")
    page.check("#retrain-form input[name=fresh]")
    page.click("#retrain-form button")
    flash = page.wait_for_selector("#flash").inner_text()
    row = db.execute("SELECT id, status, trigger, requested_by, reason, params FROM training_jobs").fetchall()
    assert len(row) == 1
    job_id, status, trigger, by, reason, params = row[0]
    assert (status, trigger, by, reason) == ("queued", "admin", "admin", "new corrections on shirts")
    assert params == {"preset": "tiny", "warm_start": False}
    assert f"Training job #{job_id} queued" in flash
    assert f"#{job_id} queued (admin, admin: new corrections on shirts)" in page.inner_text("#jobs")
    assert _queue_len("train") == 1  # waiting for a train worker; none listens here
    assert any(a == "retrain" and d["job"] == job_id for a, d in _actions(db, "admin"))


def test_metrics_side_by_side_show_both_versions_figures(browser, console_url, db, tmp_path, screenshots):
    _seed_two(db, tmp_path)
    # shadow figures for m-b, and a running job, so the screenshot shows every panel
    db.execute("UPDATE models SET status = 'shadow' WHERE model_version = 'm-b'")
    for i, (cand, act, truth) in enumerate([("shirt", "shirt", "shirt"), ("t-shirt", "shirt", "t-shirt"),
                                            ("dress", "dress", "dress")]):
        db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash) VALUES (%s, 's', '{}', 'h')",
                   (f"l{i}",))
        db.execute("INSERT INTO shadow_predictions (model_version, listing_id, tag_group, value, confidence,"
                   " active_version, active_value, created_at) VALUES ('m-b', %s, 'category', %s, 0.9, 'm-a', %s,"
                   " now() - interval '1 hour')", (f"l{i}", cand, act))
        db.execute("INSERT INTO corrections (event_id, listing_id, tag_group, old_value, new_value, corrected_by,"
                   " corrected_at) VALUES (%s, %s, 'category', %s, %s, 'rita', now())", (f"e{i}", f"l{i}", act, truth))
    db.execute("INSERT INTO training_jobs (status, trigger, requested_by, reason, progress, started_at)"
               " VALUES ('running', 'admin', 'admin', 'new corrections', %s::jsonb, now())",
               (json.dumps({"stage": "2-classification", "step": 1200, "of": 4800}),))

    page = sign_in(browser, console_url, "admin")
    page.goto(f"{console_url}/models?version=m-b")
    table = page.inner_text("#side-by-side")
    assert "m-b" in table and "m-a (active)" in table
    top1 = page.locator("#side-by-side tr", has_text="test/top1").inner_text()
    assert "0.9500" in top1 and "0.9000" in top1 and "+0.0500" in top1 and "better" in top1
    recall = page.locator("#side-by-side tr", has_text="test/recall@1").inner_text()
    assert recall.count("0.8000") == 2 and "same" in recall
    assert "would pass" in page.inner_text("#selected")
    shadow = page.inner_text("#shadow")
    assert "3 listings predicted in shadow" in shadow and "100.0%" in shadow and "66.7%" in shadow
    assert page.locator("#jobs-list progress").get_attribute("value") == "1200"
    assert "2-classification step 1200/4800" in page.inner_text("#jobs")
    loaded = page.eval_on_selector_all("#plots img", "els => els.map(e => e.complete && e.naturalWidth > 0)")
    assert loaded == [True, True]  # loss.png and per_label_f1.png, the plots m-b's report has
    page.screenshot(path=str(screenshots / "models.png"), full_page=True)
    # the running job's progress follows without a reload (models.js)
    db.execute("UPDATE training_jobs SET progress = progress || '{\"step\": 2400}'::jsonb")
    expect(page.locator("#jobs-list progress")).to_have_attribute("value", "2400", timeout=10_000)


def test_a_plot_png_is_served_for_a_registered_model_and_traversal_is_refused(browser, console_url, db, tmp_path):
    _seed_two(db, tmp_path)
    page = sign_in(browser, console_url, "reviewer")
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
    status, ctype, body = _get(console_url, "/models/m-a/plots/loss.png", cookie)
    assert status == 200 and ctype == "image/png" and body.startswith(b"\x89PNG")
    for path in ("/models/m-a/plots/../manifest.json",  # sent as is: no client normalises it
                 "/models/m-a/plots/..%2Fmanifest.json", "/models/m-a/plots/..%2F..%2Fm-b%2Freport%2Floss.png",
                 "/models/..%2Fm-a/plots/loss.png", "/models/../plots/loss.png",
                 "/models/m-a/plots/summary.md",  # in the report directory, but not a plot
                 "/models/m-a/plots/confusion.png",  # an allowed name the report does not have
                 "/models/not-registered/plots/loss.png", "/models/m-a/plots/%2Fetc%2Fpasswd"):
        status, _, body = _get(console_url, path, cookie)
        assert status == 404, path
        assert b"not a plot" not in body and b"model_version" not in body and not body.startswith(b"\x89PNG"), path
    status, _, body = _get(console_url, "/models/m-a/plots/loss.png", "")
    assert status in (303, 401) and not body.startswith(b"\x89PNG")  # signed out: the login page or a 401


@pytest.mark.parametrize("console_settings", ["broker-down"], indirect=True)
def test_a_broker_outage_after_a_promotion_shows_a_clear_message(browser, console_url, db, tmp_path):
    _seed_two(db, tmp_path)
    page = sign_in(browser, console_url, "admin")
    page.goto(f"{console_url}/models?version=m-b")
    page.fill("#promote-form input[name=reason]", "better")
    page.click("#promote-form button")
    page.click("#promote-confirm .confirm-yes")
    flash = page.wait_for_selector("#flash").inner_text()
    assert "m-b is active (previous: m-a); catalogue backfill NOT enqueued" in flash
    assert "Broker not reachable" in flash and "enrich backfill m-b" in flash
    assert active_model(db).model_version == "m-b"  # the alias moved all the same
    # and a retrain that cannot be sent says so; its row is marked failed
    page.fill("#retrain-form input[name=reason]", "more data")
    page.click("#retrain-form button")
    assert "Broker not reachable: the training job was not queued" in page.wait_for_selector("#flash").inner_text()
    assert db.execute("SELECT status FROM training_jobs").fetchall() == [("failed",)]


def _get(base: str, path: str, cookie: str) -> tuple[int, str, bytes]:
    """GET a raw path (no normalisation, no redirects followed) with the session cookie."""
    netloc = urlsplit(base).netloc
    conn = http.client.HTTPConnection(netloc, timeout=10)
    try:
        conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        res = conn.getresponse()
        return res.status, res.getheader("content-type", ""), res.read()
    finally:
        conn.close()
