"""The models page's confirmations in Chromium against the served console: promote and roll back open a dialog
naming the gate's preview, the version that stops and the one that starts serving and the backfill's size;
Cancel sends nothing; a promotion the preview would refuse looks different; without JS the forms still post
and the server decides alone; un-reject goes through the registry's check; each version shows its training
job and data; the page fits 390 px."""
from __future__ import annotations

import json

import pytest
from kombu import Connection

from core.celery_app import configure
from core.config import Settings
from model.checkpoint import save_model
from model.manifest import record_lineage
from model.network import build_model
from model.registry import active_model, get_model, promote, register_candidate
from schemas.taxonomy import load_taxonomy
from tests.console.conftest import sign_in
from tests.console.test_models import BROKER_DB6, QUEUES, _model, _queue_len, _seed_two
from training import jobs


@pytest.fixture(autouse=True)
def _isolated(db):
    """Empty queues in the console's redis db 6 before and after; the Celery app left as other tests expect."""
    def drop():
        with Connection(BROKER_DB6) as conn:
            conn.default_channel.client.delete(*QUEUES)

    drop()
    yield
    drop()
    configure(Settings())


def _catalogue(db, done_by: dict[str, int], todo: int = 0, deleted: int = 0) -> None:
    """Listings enriched by the given versions (current: content unchanged since), `todo` never enriched and
    `deleted` ones (never backfilled)."""
    rows: list[tuple[str | None, str]] = [(v, "enriched") for v, n in done_by.items() for _ in range(n)]
    rows += [(None, "pending")] * todo + [(None, "deleted")] * deleted
    for i, (version, status) in enumerate(rows):
        db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash, status, enriched_hash,"
                   " enriched_by) VALUES (%s, 's', '{}', 'h', %s, %s, %s)",
                   (f"c{i}", status, "h" if version else None, version))


def _moves(db) -> int:
    return db.execute("SELECT count(*) FROM model_events").fetchone()[0]


def _posts(page) -> list[str]:
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if r.method == "POST" else None)
    return sent


def test_promote_asks_first_naming_the_versions_and_the_backfill(browser, console_url, db, tmp_path, screenshots):
    _seed_two(db, tmp_path)
    _catalogue(db, {"m-a": 3, "m-b": 1}, todo=1, deleted=2)  # m-b would re-enrich the 3 of m-a and the pending one
    page = sign_in(browser, console_url, "admin")
    posts = _posts(page)
    page.goto(f"{console_url}/models?version=m-b")
    button = page.locator("#promote-form button")
    assert button.inner_text() == "Promote through the gate" and "warn" not in (button.get_attribute("class") or "")
    dialog = page.locator("#promote-confirm")
    assert not dialog.is_visible()

    page.fill("#promote-form input[name=reason]", "better top-1")
    button.click()
    assert dialog.is_visible()
    text = dialog.inner_text()
    assert "Promote m-b?" in text and "would pass it" in text
    assert "stops serving: m-a" in text and "starts serving: m-b" in text
    assert "backfill: 4 stored listing(s) re-enriched by m-b" in text
    assert "Reason: better top-1" in text
    page.screenshot(path=str(screenshots / "models_confirm.png"))

    dialog.locator(".confirm-no").click()  # Cancel: nothing is sent, nothing moves
    assert not dialog.is_visible()
    page.wait_for_timeout(300)  # a POST would have left by now
    assert posts == [] and active_model(db).model_version == "m-a" and get_model(db, "m-b").status == "candidate"
    button.click()
    page.keyboard.press("Escape")  # closing it with the keyboard is a cancel too
    assert not dialog.is_visible() and posts == []

    button.click()
    dialog.locator(".confirm-yes").click()
    assert "m-b is active (previous: m-a); catalogue backfill enqueued" in page.wait_for_selector("#flash").inner_text()
    assert posts == [f"{console_url}/models/m-b/promote"]
    assert active_model(db).model_version == "m-b" and _queue_len("backfill") == 1


def test_a_promotion_the_gate_would_refuse_looks_different_and_the_server_decides_without_the_dialog(
        browser, console_url, db, tmp_path):
    _seed_two(db, tmp_path, candidate_top1=0.50)
    _catalogue(db, {"m-a": 2})
    page = sign_in(browser, console_url, "admin")
    posts = _posts(page)
    page.goto(f"{console_url}/models?version=m-b")
    button = page.locator("#promote-form button")
    assert button.inner_text() == "Promote — the gate would refuse it" and "warn" in button.get_attribute("class")
    page.fill("#promote-form input[name=reason]", "try it anyway")
    button.click()
    dialog = page.locator("#promote-confirm")
    text = dialog.inner_text()
    assert "The gate would refuse it: m-b is marked rejected and m-a keeps serving; nothing is re-enriched." in text
    assert "test/top1: candidate 0.5000 is worse than active 0.9000" in text
    assert "backfill: 2 stored listing(s) re-enriched by m-b" in text  # only if it passes after all
    assert dialog.locator(".confirm-yes").inner_text() == "Promote anyway"
    dialog.locator(".confirm-no").click()
    page.wait_for_timeout(300)
    assert posts == [] and get_model(db, "m-b").status == "candidate"

    # a POST without the dialog (no JS, a script) goes through the gate all the same
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    res = page.request.post(f"{console_url}/models/m-b/promote", form={"csrf": token, "reason": "no dialog"})
    assert res.ok and "The gate refused m-b against the active m-a" in res.text()
    assert active_model(db).model_version == "m-a" and get_model(db, "m-b").status == "rejected"
    # un-reject moves only a rejected version (model.registry.unreject, under the promotion lock)
    res = page.request.post(f"{console_url}/models/m-a/unreject", form={"csrf": token, "reason": "why not"})
    assert "Nothing changed: m-a is active, not rejected" in res.text()
    assert get_model(db, "m-a").status == "active"


def test_rollback_asks_first_and_without_js_the_form_posts(browser, console_url, db, tmp_path):
    _seed_two(db, tmp_path)
    assert promote(db, "m-b", actor="seed", reason="better").promoted
    _catalogue(db, {"m-a": 1, "m-b": 4})
    page = sign_in(browser, console_url, "admin")
    posts = _posts(page)
    page.goto(f"{console_url}/models?version=m-a")
    page.fill("#rollback-form input[name=reason]", "shelves look wrong")
    page.click("#rollback-form button")
    text = page.inner_text("#rollback-confirm")
    assert "stops serving: m-b" in text and "starts serving again: m-a" in text
    assert "backfill: 4 stored listing(s) re-enriched by m-a" in text
    page.click("#rollback-confirm .confirm-no")
    page.wait_for_timeout(300)
    assert posts == [] and active_model(db).model_version == "m-b"
    moves = _moves(db)

    # no JS: no dialog, the form posts as it is
    plain = sign_in(browser, console_url, "admin", java_script_enabled=False)
    plain.goto(f"{console_url}/models?version=m-a")
    plain.fill("#rollback-form input[name=reason]", "shelves look wrong")
    plain.click("#rollback-form button")
    assert "m-a is active again (was m-b)" in plain.wait_for_selector("#flash").inner_text()
    assert active_model(db).model_version == "m-a" and _moves(db) == moves + 1
    plain.context.close()


def test_each_version_shows_its_training_job_and_data(browser, console_url, db, tmp_path):
    _model(db, tmp_path, "by-hand", {"test/top1": 0.9}, plots=False)
    job = jobs.create_job(db, trigger="admin", requested_by="alice", reason="new shirts",
                          params={"preset": "tiny", "warm_start": False})
    db.execute("UPDATE training_jobs SET status = 'done', outcome = 'waiting for an admin', progress = %s::jsonb"
               " WHERE id = %s", (json.dumps({"stage": "gate", "preset": "tiny", "dataset": "fmnist-shop",
                                              "corrections": 7, "correction_rows": 9}), job))
    out = tmp_path / "models" / "from-job"
    model = build_model("small_cnn", load_taxonomy("fashion-mnist"), pretrained=False, embedding_dim=16)
    save_model(model, out, model_version="from-job", image_size=28, metrics={"test/top1": 0.91},
               dataset="fmnist-shop", data_fingerprint="f" * 40, eval_set="fmnist-test")
    record_lineage(out, job=job, corrections=7, corrections_sha256="c" * 64, extra_rows=9)
    register_candidate(db, out, actor="alice", reason=f"retraining job #{job}")

    page = sign_in(browser, console_url, "reviewer")
    page.goto(f"{console_url}/models?version=by-hand")
    assert "fashion-mnist" in page.inner_text("tr[data-version='by-hand'] .origin")
    assert page.locator("tr[data-version='by-hand'] a.job-link").count() == 0
    assert "trained by hand" in page.inner_text("#training-job")

    row = page.locator("tr[data-version='from-job']")
    assert row.locator("a.job-link").inner_text() == f"job #{job}"
    assert row.locator(".origin").inner_text() == "fmnist-shop · fashion-mnist v1 · 7 correction(s)"
    row.locator("a.job-link").click()
    page.wait_for_url(f"{console_url}/models?version=from-job#training")
    assert "dataset fmnist-shop · taxonomy fashion-mnist v1 · data ffffffffffff" in page.inner_text("#training-data")
    assert "7 corrected label(s) · 9 extra training row(s)" in page.inner_text("#training-corrections")
    line = page.inner_text("#training-job")
    assert f"#{job} done (admin, alice: new shirts) waiting for an admin" in line
    for shown in ("preset tiny", "warm_start False", "dataset fmnist-shop", "correction rows 9"):
        assert shown in line, shown
    assert page.get_attribute("#training-job a", "href") == f"#job-{job}"  # the job in the jobs list


def test_the_models_page_fits_a_phone(browser, console_url, db, tmp_path, screenshots):
    _seed_two(db, tmp_path, candidate_top1=0.50)
    page = sign_in(browser, console_url, "admin", viewport={"width": 390, "height": 844})
    page.goto(f"{console_url}/models?version=m-b")
    page.screenshot(path=str(screenshots / "models_390.png"), full_page=True)
    wide = page.evaluate("""() => [...document.querySelectorAll('main .card, main form, main button, main dialog')]
        .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5).map(e => e.id || e.className)""")
    assert wide == []
    assert page.evaluate("() => document.querySelector('main').scrollWidth <= window.innerWidth")
    page.fill("#promote-form input[name=reason]", "phone")
    page.click("#promote-form button")
    box = page.locator("#promote-confirm").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    page.context.close()
