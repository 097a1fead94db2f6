"""The jobs list's cancel button through Chromium against the served console: an admin cancels a queued job at
once and asks a running one to stop; a finished job cannot be cancelled; reviewers and POSTs without the
session's CSRF token are refused."""
from __future__ import annotations

import json

from tests.console.conftest import sign_in
from training import jobs


def _jobs(db) -> dict[str, int]:
    """A queued, a running (beating, at a training step) and a finished job."""
    ids = {name: jobs.create_job(db, trigger="admin", requested_by="alice", reason=f"{name} one")
           for name in ("queued", "running", "done")}
    db.execute("UPDATE training_jobs SET status = 'running', started_at = now(), heartbeat_at = now(),"
               " progress = %s::jsonb WHERE id = %s",
               (json.dumps({"stage": "2-classification", "step": 720, "of": 4800}), ids["running"]))
    db.execute("UPDATE training_jobs SET status = 'done', started_at = now(), finished_at = now(),"
               " outcome = 'waiting for an admin' WHERE id = %s", (ids["done"],))
    return ids


def _cancel_actions(db) -> list[tuple[str, dict]]:
    return db.execute("SELECT user_name, details FROM console_actions WHERE action = 'cancel_job' ORDER BY id"
                      ).fetchall()


def test_an_admin_cancels_jobs_from_the_list_and_others_are_refused(browser, console_url, db):
    ids = _jobs(db)

    reviewer = sign_in(browser, console_url, "reviewer")
    reviewer.goto(f"{console_url}/models")
    assert f"#{ids['queued']} queued" in reviewer.inner_text("#jobs")
    assert reviewer.locator(".job-cancel").count() == 0  # no buttons for reviewers
    token = reviewer.locator('meta[name="csrf-token"]').get_attribute("content")  # a valid token of their own
    res = reviewer.request.post(f"{console_url}/models/jobs/{ids['queued']}/cancel", form={"csrf": token})
    assert res.status == 403
    refused = db.execute("SELECT details->>'path' FROM console_actions WHERE user_name = 'reviewer'"
                         " AND action = 'models.refused'").fetchall()
    assert (f"/models/jobs/{ids['queued']}/cancel",) in refused

    admin = sign_in(browser, console_url, "admin")
    admin.goto(f"{console_url}/models")
    for form in ({}, {"csrf": "not-the-sessions-token"}):  # a forged POST from another site
        assert admin.request.post(f"{console_url}/models/jobs/{ids['queued']}/cancel", form=form).status == 403
    assert jobs.get_job(db, ids["queued"])["status"] == "queued" and _cancel_actions(db) == []
    assert admin.locator(f"#job-{ids['done']} .job-cancel").count() == 0  # nothing to cancel there

    admin.click(f"#job-{ids['queued']} .job-cancel button")
    assert f"Training job #{ids['queued']} cancelled." in admin.wait_for_selector("#flash").inner_text()
    job = jobs.get_job(db, ids["queued"])
    assert job["status"] == "cancelled" and job["outcome"] == "cancelled by admin before it started"

    admin.click(f"#job-{ids['running']} .job-cancel button")
    flash = admin.wait_for_selector("#flash").inner_text()
    assert f"Training job #{ids['running']} is running: cancel requested" in flash
    job = jobs.get_job(db, ids["running"])
    assert job["status"] == "running" and job["cancel_requested_by"] == "admin"  # its worker stops it
    line = admin.inner_text(f"#job-{ids['running']}")
    assert "step 720/4800" in line and "cancelling (asked by admin)" in line
    assert admin.locator(f"#job-{ids['running']} .job-cancel").count() == 0  # asked once

    token = admin.locator('meta[name="csrf-token"]').get_attribute("content")
    res = admin.request.post(f"{console_url}/models/jobs/{ids['done']}/cancel", form={"csrf": token})
    assert res.ok and f"Not cancelled: job #{ids['done']} is already done: nothing to cancel" in res.text()
    assert jobs.get_job(db, ids["done"])["status"] == "done"
    logged = [(who, d["job"], d.get("status"), d.get("error")) for who, d in _cancel_actions(db)]
    assert logged == [("admin", ids["queued"], "cancelled", None), ("admin", ids["running"], "running", None),
                      ("admin", ids["done"], None, f"job #{ids['done']} is already done: nothing to cancel")]
