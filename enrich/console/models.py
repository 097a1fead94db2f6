"""The models page: every registered version with its status, the reasons of its last gate verdict, a link
to the job that trained it and what it was trained on; the selected one's lineage, training data and job,
metrics beside the active model's, gate verdicts, training report plots and shadow figures; the alias moves;
retraining jobs and the running one's progress. Admins promote (through the gate), reject and un-reject
(model.registry.unreject: under the promotion lock, only a rejected version), roll back, run a candidate in
shadow and ask for a retrain, each with a reason, and cancel a queued or running retraining job; reviewers see
the page without the buttons and their POSTs are refused. Before a promotion or a rollback is sent, a dialog
(models.js) says what it will change: the gate's preview, which version stops and which starts serving, and
how many stored listings the backfill re-enriches; the server decides on its own when the form arrives.

Everything goes through the library, never a copy of it: training.gate (promote, preview — the gate `enrich
promote` and retraining jobs go through too), model.registry (unreject, reject_by_hand, rollback, set_shadow,
backfill_after), model.shadow.shadow_report, training.jobs (request_retrain, retrain_params, job_progress,
cancel_job), worker.backfill.count_todo (the backfill's size). Every action is logged with the user
(users.log_action); an action's outcome is shown once on the page after the redirect (post/redirect/get).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from psycopg.rows import dict_row

from core.celery_app import configure
from core.config import Settings
from enrich.console.auth import User, check_csrf, current_user
from enrich.console.deps import connection, render
from enrich.console.users import log_action
from model import registry
from model.artifacts import store_from_settings
from model.registry import Decision, ModelRow
from model.shadow import shadow_report
from training import gate, jobs
from training.config import PRESETS
from worker.backfill import count_todo

log = logging.getLogger(__name__)
router = APIRouter()

# the plots training/report.py writes into a model directory's report/: the only files the plot route serves
PLOTS: dict[str, str] = {"loss.png": "Training loss per stage", "confusion.png": "Category confusion",
                         "per_label_f1.png": "F1 per attribute label", "recall_at_k.png": "Retrieval recall@k"}
SUMMARY_METRICS = ("test/top1", "test/recall@1", "test/attr/exact_match")  # as `enrich models` shows them
_FLASH = "models_flash"
_MAX_REASON = 500
# (version, artifact, sha256, path) -> the model's local directory; fetching an artifact verifies its weights'
# hash, which is too slow to repeat for every plot request
_dirs: dict[tuple[str, str | None, str | None, str], Path] = {}


def admin_only(request: Request, user: User = Depends(current_user)) -> User:
    """Like auth.require_admin, and the refused attempt is logged with the user."""
    if not user.is_admin:
        with connection(request) as conn:
            log_action(conn, user.name, "models.refused", path=request.url.path)
        log.warning("%s (%s) was refused %s", user.name, user.role, request.url.path)
        raise HTTPException(status_code=403, detail="admins only: reviewers can look at the models, not change them")
    return user


# ---- reading -------------------------------------------------------------------------------------------

def _model_dir(row: ModelRow, settings: Settings) -> Path:
    key = (row.model_version, row.artifact_uri, row.sha256, row.path)
    found = _dirs.get(key)
    if found is None:
        found = _dirs[key] = registry.local_dir(row, store_from_settings(settings) if row.artifact_uri else None)
    return found


def report_plots(row: ModelRow, settings: Settings) -> tuple[list[str], str | None]:
    """The allow-listed plot names present in the model's report/, and why there are none when so."""
    try:
        folder = _model_dir(row, settings) / "report"
    except Exception as exc:
        log.warning("report of %s not readable: %s", row.model_version, exc)
        return [], f"the model's files are not readable here: {exc}"
    names = [n for n in PLOTS if (folder / n).is_file()]
    return names, None if names else "no training report plots in the model's directory"


def side_by_side(selected: ModelRow | None,
                 active: ModelRow | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows (metric, selected, active, difference, direction, verdict): gate metrics first, then the rest."""
    mine = selected.metrics if selected else {}
    theirs = active.metrics if active is not None and active is not selected else {}
    rows = []
    for key in sorted(set(mine) | set(theirs), key=lambda k: (k not in gate.GATE_METRICS, k)):
        a, b = mine.get(key), theirs.get(key)
        higher = gate.GATE_METRICS.get(key)
        diff = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        verdict = ""
        if diff is not None and higher is not None:
            verdict = "same" if diff == 0 else ("better" if (diff > 0) == higher else "worse")
        rows.append({"key": key, "selected": a, "active": b, "diff": diff, "gate": higher is not None,
                     "direction": "" if higher is None else ("higher is better" if higher else "lower is better"),
                     "verdict": verdict})
    return [r for r in rows if r["gate"]], [r for r in rows if not r["gate"]]


def _pick(rows: list[ModelRow], version: str | None) -> ModelRow | None:
    if version:
        for r in rows:
            if r.model_version == version:
                return r
        raise HTTPException(status_code=404, detail=f"model {version!r} is not registered")
    waiting = [r for r in rows if r.status in ("shadow", "candidate")]
    active = [r for r in rows if r.status == "active"]
    found = waiting or active or rows
    return found[0] if found else None


def _jobs(conn: psycopg.Connection, settings: Settings) -> tuple[list[dict[str, Any]], bool]:
    found = jobs.job_progress(conn, 5, stale_s=settings.job_stale_s)
    return found, any(j["status"] in ("queued", "running") for j in found)


# what a job notes about its training run (training.jobs._Progress.note) that the page shows with its params
_JOB_FACTS = ("preset", "dataset", "warm_start", "corrections", "correction_rows", "held_out")


def _origins(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    """model_version -> where it comes from, as recorded: the manifest's dataset, taxonomy, data fingerprint and
    lineage (corrections used, warm start), and the job that trained it (the lineage's job, else the latest job
    row naming the version) with its parameters, what it noted and its outcome."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT m.model_version, m.manifest->>'dataset' AS dataset, m.manifest->'taxonomy'->>'name' AS tax,"
            " m.manifest->'taxonomy'->>'version' AS tax_version, m.manifest->>'data_fingerprint' AS fingerprint,"
            " coalesce(m.manifest->'lineage', '{}'::jsonb) AS lineage, j.id, j.status, j.trigger, j.requested_by,"
            " j.reason, j.params, j.progress, j.outcome, j.cancel_requested_by"
            " FROM models m LEFT JOIN LATERAL (SELECT * FROM training_jobs t"
            "  WHERE t.id = (m.manifest->'lineage'->>'job')::bigint OR t.model_version = m.model_version"
            "  ORDER BY t.id = (m.manifest->'lineage'->>'job')::bigint DESC NULLS LAST, t.id DESC LIMIT 1) j ON true")
        rows = cur.fetchall()
    out = {}
    for r in rows:
        lin, progress, params = r["lineage"], r["progress"] or {}, r["params"] or {}
        data = [r["dataset"] or progress.get("dataset") or params.get("dataset") or ""]
        if r["tax"]:
            data.append(f"{r['tax']} v{r['tax_version']}")
        corrections = lin.get("corrections") or 0
        data.append(f"{corrections} correction(s)")
        out[r["model_version"]] = {
            "job": lin.get("job") or r["id"], "job_found": r["id"] is not None,
            "job_line": jobs.describe(r, age=False) if r["id"] is not None else "",
            "params": sorted(params.items()),
            "facts": [(k, progress[k]) for k in _JOB_FACTS if k in progress],
            "dataset": data[0], "taxonomy": f"{r['tax']} v{r['tax_version']}" if r["tax"] else "",
            "fingerprint": r["fingerprint"] or "", "corrections": corrections,
            "corrections_through": lin.get("corrections_through"), "extra_rows": lin.get("extra_rows") or 0,
            "summary": " · ".join(d for d in data if d)}
    return out


def confirmations(conn: psycopg.Connection, selected: ModelRow, active: ModelRow | None,
                  preview: gate.Verdict | None) -> dict[str, dict[str, Any]]:
    """What the promote and rollback dialogs say will change: the version that stops serving and the one that
    starts, the gate's preview, and the size of the backfill that follows (the listings whose current
    enrichment is not the new version's: what worker.backfill re-enriches). Only for the forms the page shows."""
    version, current = selected.model_version, active.model_version if active else None
    out: dict[str, dict[str, Any]] = {}
    promotable = selected.status in ("candidate", "shadow", "rejected")
    back = selected.was_active and selected.status != "active"
    if not (promotable or back):
        return out
    backfill = count_todo(conn, version)
    if promotable:
        outcome = "pass" if preview is None or preview.passed else preview.outcome
        out["promote"] = {"outcome": outcome, "warn": outcome != "pass", "stops": current, "starts": version,
                          "backfill": backfill, "reasons": list(preview.reasons) if preview else []}
    if back:
        out["rollback"] = {"stops": current, "starts": version, "backfill": backfill}
    return out


@router.get("/models")
def models_page(request: Request, version: str | None = None, user: User = Depends(current_user)) -> Response:
    settings = request.app.state.settings
    with connection(request) as conn:
        rows = registry.list_models(conn)
        selected = _pick(rows, version)
        active = next((r for r in rows if r.status == "active"), None)
        shadow = shadow_report(conn, selected.model_version) if selected else None
        moves = registry.history(conn, 15)
        job_list, live = _jobs(conn, settings)
        last = {v.model_version: gate.summary(v.gate) for v in registry.verdicts(conn, last=True)}
        selected_verdicts = registry.verdicts(conn, selected.model_version) if selected else []
        origins = _origins(conn)
        preview = None
        if selected is not None and active is not None and selected.model_version != active.model_version:
            preview = gate.preview(selected, active, settings)  # the gate on the stored figures
        confirm = confirmations(conn, selected, active, preview) if selected and user.is_admin else {}
    gate_rows, other_rows = side_by_side(selected, active)
    plots, plots_note = report_plots(selected, settings) if selected else ([], None)
    return render(request, "models.html", user=user, page="models", rows=rows, selected=selected, active=active,
                  gate_rows=gate_rows, other_rows=other_rows, preview=preview, plots=plots, plot_titles=PLOTS,
                  plots_note=plots_note, shadow=shadow, moves=moves, jobs=job_list, live=live, last_verdict=last,
                  verdicts=[(v, gate.explain(v.gate)) for v in selected_verdicts], origins=origins, confirm=confirm,
                  presets=sorted(PRESETS), default_preset=settings.retrain_preset, summary=SUMMARY_METRICS,
                  flash=request.session.pop(_FLASH, None))


@router.get("/models/jobs")
def jobs_partial(request: Request, user: User = Depends(current_user)) -> Response:
    """The jobs list alone: models.js reloads it every few seconds while a job is queued or running."""
    with connection(request) as conn:
        job_list, live = _jobs(conn, request.app.state.settings)
    return render(request, "_models_jobs.html", user=user, jobs=job_list, live=live)


@router.get("/models/{version}/plots/{name}")
def plot(request: Request, version: str, name: str, user: User = Depends(current_user)) -> Response:
    """A training report plot: only a registered version, only a name on the PLOTS list."""
    if name not in PLOTS:
        raise HTTPException(status_code=404, detail="no such plot")
    with connection(request) as conn:
        row = registry.get_model(conn, version)
    if row is None:
        raise HTTPException(status_code=404, detail=f"model {version!r} is not registered")
    names, why = report_plots(row, request.app.state.settings)
    if name not in names:
        raise HTTPException(status_code=404, detail=why or f"{version} has no {name}")
    return FileResponse(_model_dir(row, request.app.state.settings) / "report" / name, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300"})


# ---- actions -------------------------------------------------------------------------------------------

def _back(request: Request, version: str | None, kind: str, text: str, reasons: list[str] | None = None,
          anchor: str = "") -> RedirectResponse:
    request.session[_FLASH] = {"kind": kind, "text": text[:1000], "reasons": [r[:400] for r in reasons or []][:10]}
    where = "/models" + (f"?version={quote(version, safe='')}" if version else "") + anchor
    return RedirectResponse(where, status_code=303)


def _reason(reason: str) -> str:
    return reason.strip()[:_MAX_REASON]


def _backfill(decision: Decision, settings: Settings) -> tuple[str, str | None]:
    """(what happened to the backfill, an error when the broker refused it)."""
    try:
        sent = registry.backfill_after(decision, settings)
        return ("catalogue backfill enqueued" if sent else "no backfill needed"), None
    except registry.BackfillNotSent as exc:
        return "catalogue backfill NOT enqueued", f"Broker not reachable: {exc}"


@router.post("/models/{version}/promote", dependencies=[Depends(check_csrf)])
def promote(request: Request, version: str, reason: str = Form(""), require_shadow: str = Form(""),
            user: User = Depends(admin_only)) -> Response:
    """Through the gate (stored figures and held-out corrections; optionally the shadow figures too); then the
    backfill."""
    reason = _reason(reason)
    if not reason:
        return _back(request, version, "error", "Not promoted: a reason is required.")
    try:
        min_corrections = int(require_shadow) if require_shadow.strip() else None
        if min_corrections is not None and min_corrections < 1:
            raise ValueError
    except ValueError:
        return _back(request, version, "error", "Not promoted: the shadow requirement is a number of corrections "
                                                "(1 or more), or empty.")
    settings = request.app.state.settings
    with connection(request) as conn:
        try:
            decision = gate.promote(conn, version, settings, actor=user.name, reason=reason,
                                   shadow_min_corrections=min_corrections)
        except LookupError as exc:
            log_action(conn, user.name, "promote", version=version, reason=reason, error=str(exc))
            return _back(request, None, "error", f"Not promoted: {exc}")
        backfill, broker_error = _backfill(decision, settings) if decision.promoted else (None, None)
        log_action(conn, user.name, "promote", version=version, reason=reason, promoted=decision.promoted,
                   previous=decision.previous, reasons=decision.reasons, require_shadow=min_corrections,
                   backfill=backfill)
    if not decision.promoted:
        what = ("it is marked rejected (an admin can un-reject it)." if decision.status == "rejected" else
                "the two cannot be compared, it stays a candidate.")
        return _back(request, version, "refused", f"The gate refused {version} against the active "
                                                  f"{decision.previous}; {what}", decision.reasons)
    if decision.previous == version:
        return _back(request, version, "ok", f"{version} is already the active model.")
    text = f"{version} is active (previous: {decision.previous or 'none'}); {backfill}."
    return _back(request, version, "error" if broker_error else "ok",
                 text + (f" {broker_error}" if broker_error else ""))


@router.post("/models/{version}/unreject", dependencies=[Depends(check_csrf)])
def unreject(request: Request, version: str, reason: str = Form(""), user: User = Depends(admin_only)) -> Response:
    """Put a rejected candidate back to 'candidate' (model.registry.unreject, as `enrich models unreject`)."""
    return _status_change(request, version, reason, user, "unreject", registry.unreject,
                          f"{version} is a candidate again; it can be promoted through the gate.")


@router.post("/models/{version}/reject", dependencies=[Depends(check_csrf)])
def reject(request: Request, version: str, reason: str = Form(""), user: User = Depends(admin_only)) -> Response:
    """Reject a candidate by hand (model.registry.reject_by_hand, as `enrich models reject`)."""
    return _status_change(request, version, reason, user, "reject", registry.reject_by_hand,
                          f"{version} is rejected; un-reject it to promote it later.")


def _status_change(request: Request, version: str, reason: str, user: User, action: str,
                   move: Callable[..., object], done: str) -> Response:
    reason = _reason(reason)
    if not reason:
        return _back(request, version, "error", "Nothing changed: a reason is required.")
    with connection(request) as conn:
        try:
            move(conn, version, actor=user.name, reason=reason)
        except (LookupError, PermissionError, ValueError) as exc:
            log_action(conn, user.name, action, version=version, reason=reason, error=str(exc))
            return _back(request, version, "error", f"Nothing changed: {exc}")
        log_action(conn, user.name, action, version=version, reason=reason)
    return _back(request, version, "ok", done)


@router.post("/models/{version}/rollback", dependencies=[Depends(check_csrf)])
def rollback(request: Request, version: str, reason: str = Form(""), user: User = Depends(admin_only)) -> Response:
    """Make a version that was active before active again, without the gate; then the backfill."""
    reason = _reason(reason)
    if not reason:
        return _back(request, version, "error", "Not rolled back: a reason is required.")
    settings = request.app.state.settings
    with connection(request) as conn:
        try:
            decision = registry.rollback(conn, version, actor=user.name, reason=reason)
        except (LookupError, PermissionError) as exc:
            log_action(conn, user.name, "rollback", version=version, reason=reason, error=str(exc))
            return _back(request, version, "error", f"Not rolled back: {exc}")
        backfill, broker_error = _backfill(decision, settings)
        log_action(conn, user.name, "rollback", version=version, reason=reason, previous=decision.previous,
                   backfill=backfill)
    if decision.previous == version:
        return _back(request, version, "ok", f"{version} is already the active model.")
    text = f"{version} is active again (was {decision.previous or 'none'}); {backfill}."
    return _back(request, version, "error" if broker_error else "ok",
                 text + (f" {broker_error}" if broker_error else ""))


@router.post("/models/{version}/shadow", dependencies=[Depends(check_csrf)])
def shadow(request: Request, version: str, run: str = Form("on"), reason: str = Form(""),
           user: User = Depends(admin_only)) -> Response:
    """Run a candidate in shadow (`run=on`), or stop the shadow run (`run=off`)."""
    reason = _reason(reason)
    if not reason:
        return _back(request, version, "error", "Nothing changed: a reason is required.")
    on = run != "off"
    with connection(request) as conn:
        try:
            registry.set_shadow(conn, version if on else None, actor=user.name, reason=reason)
        except (LookupError, PermissionError) as exc:
            log_action(conn, user.name, "shadow", version=version, run=on, reason=reason, error=str(exc))
            return _back(request, version, "error", f"Nothing changed: {exc}")
        log_action(conn, user.name, "shadow", version=version, run=on, reason=reason)
    return _back(request, version, "ok", f"{version} runs in shadow; workers pick it up within ENRICH_MODEL_CHECK_S."
                 if on else "No shadow model any more (its figures are kept).")


@router.post("/models/retrain", dependencies=[Depends(check_csrf)])
def retrain(request: Request, reason: str = Form(""), preset: str = Form(""), fresh: str = Form(""),
            version: str = Form(""), user: User = Depends(admin_only)) -> Response:
    """Queue a retraining job on the train queue (training.jobs.request_retrain), as `enrich retrain` does."""
    back = version or None
    reason = _reason(reason)
    if not reason:
        return _back(request, back, "error", "No job queued: a reason is required.", anchor="#jobs")
    settings = request.app.state.settings
    try:
        params = jobs.retrain_params(settings, preset or None, bool(fresh))
    except ValueError as exc:
        return _back(request, back, "error", f"No job queued: {exc}", anchor="#jobs")
    with connection(request) as conn:
        try:
            configure(settings)
            job_id = jobs.request_retrain(conn, requested_by=user.name, reason=reason, params=params)
        except Exception as exc:
            log.exception("retraining job not enqueued")
            log_action(conn, user.name, "retrain", reason=reason, params=params, error=str(exc))
            return _back(request, back, "error", f"Broker not reachable: the training job was not queued and is "
                                                 f"marked failed ({exc}). Try again when the broker is back.",
                         anchor="#jobs")
        log_action(conn, user.name, "retrain", job=job_id, reason=reason, params=params)
    return _back(request, back, "ok", f"Training job #{job_id} queued on {settings.train_queue!r} ({params['preset']}"
                                      f"{', fresh weights' if fresh else ''}).", anchor="#jobs")


@router.post("/models/jobs/{job_id}/cancel", dependencies=[Depends(check_csrf)])
def cancel_job(request: Request, job_id: int, user: User = Depends(admin_only)) -> Response:
    """Cancel a training job (training.jobs.cancel_job), as `enrich retrain --cancel` does: a queued one at once,
    a running one at its next training step."""
    with connection(request) as conn:
        try:
            status = jobs.cancel_job(conn, job_id, by=user.name)
        except (LookupError, ValueError) as exc:
            log_action(conn, user.name, "cancel_job", job=job_id, error=str(exc))
            return _back(request, None, "error", f"Not cancelled: {exc}", anchor="#jobs")
        log_action(conn, user.name, "cancel_job", job=job_id, status=status)
    return _back(request, None, "ok", f"Training job #{job_id} cancelled." if status == "cancelled" else
                 f"Training job #{job_id} is running: cancel requested; it stops at its next training step.",
                 anchor="#jobs")
