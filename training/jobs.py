"""Retraining jobs (table ``training_jobs``): the rows, the one-at-a-time lock, and the chain a job runs.

The chain: train (``ENRICH_RETRAIN_PRESET`` on ``ENRICH_RETRAIN_DATASET`` plus the corrected labels, as
``enrich train --with-corrections`` does; warm start from the active model's weights where its backbone,
embedding size and taxonomy fit the preset) → measure the candidate and the active model on one fixed
evaluation set → register the candidate (artifact store; who and why from the job) → the gate → promote
when ``ENRICH_AUTO_PROMOTE``, else wait for an admin (``enrich promote VERSION``) → after a promotion,
enqueue the catalogue backfill by task name (the backfill enqueues the reindex when it is done).

One job trains at a time: a session-level Postgres advisory lock, taken with ``pg_try_advisory_lock`` on
the job's connection and held for the whole run. A job that finds it taken stays ``queued`` (progress
"waiting for the lock") and ``run_job`` raises ``JobBusy``; its Celery task retries later. A ``running``
row while nobody holds the lock belongs to a worker that died: the next job (or beat tick) marks it
failed. Plain functions; ``training.tasks`` wraps them as Celery tasks and ``enrich retrain`` creates jobs.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import psycopg
from psycopg.rows import dict_row

from core.config import Settings

log = logging.getLogger(__name__)

LOCK_KEY = 7_402_114  # pg advisory lock: the one running training job (registry promotions use 7_402_113)
SCHEDULE_LOCK_KEY = 7_402_115  # serialises beat ticks (two beats by mistake still create one job)
MAX_WAIT_S = 6 * 3600.0  # a job still queued this long after it was created fails instead of starting
PROGRESS_EVERY_S = 2.0  # progress is written to the row at most this often (stage changes at once)
FINISHED = ("done", "failed", "skipped")
# what a job's params may set (everything else comes from the settings of the worker that runs it)
PARAM_KEYS = ("preset", "dataset", "data_dir", "warm_start", "corrections", "time_budget_s")
SCHEDULE_ACTOR = "schedule"
# the taxonomy each dataset is labelled with
_DATASET_TAXONOMY = {"fmnist-shop": "fashion-mnist", "deepfashion": "deepfashion"}
# the training-config fields that decide the fixed evaluation set
_EVAL_FIELDS = ("dataset", "data_dir", "taxonomy", "seed", "test_items", "test_photos_per_item", "catalogue_source")
_COLUMNS = ("id, status, trigger, requested_by, reason, params, progress, model_version, outcome, created_at,"
            " started_at, finished_at")


class JobBusy(RuntimeError):
    """Another training job holds the lock: this one stays queued; try again later."""


# ---- rows ----------------------------------------------------------------------------------------------

def create_job(conn: psycopg.Connection, *, trigger: str, requested_by: str, reason: str = "",
               params: dict | None = None, status: str = "queued", outcome: str | None = None) -> int:
    """Insert a job row (committed when ``conn`` autocommits) and return its id."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise ValueError(f"unknown job parameter(s) {unknown}; a job may set {', '.join(PARAM_KEYS)}")
    if status not in ("queued", "skipped"):
        raise ValueError(f"a new job is queued or skipped, not {status!r}")
    row = conn.execute(
        "INSERT INTO training_jobs (status, trigger, requested_by, reason, params, outcome, finished_at)"
        " VALUES (%s, %s, %s, %s, %s::jsonb, %s, CASE WHEN %s = 'skipped' THEN now() END) RETURNING id",
        (status, trigger, requested_by, reason, json.dumps(params, default=str), outcome, status)).fetchone()
    return int(row[0])


def get_job(conn: psycopg.Connection, job_id: int) -> dict | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM training_jobs WHERE id = %s", (job_id,))
        return cur.fetchone()


def job_progress(conn: psycopg.Connection, limit: int = 10) -> list[dict]:
    """The latest ``limit`` jobs and every queued or running one, newest first: the row's columns (id,
    status, trigger, requested_by, reason, params, progress {stage, step, of, …}, model_version, outcome,
    created_at, started_at, finished_at) plus ``summary``, one line saying where the job is."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM training_jobs WHERE status IN ('queued', 'running')"
                    " OR id IN (SELECT id FROM training_jobs ORDER BY id DESC LIMIT %s) ORDER BY id DESC", (limit,))
        rows = cur.fetchall()
    for r in rows:
        r["summary"] = describe(r)
    return rows


def describe(job: dict) -> str:
    """One line: "#7 running (admin, alice: new corrections) 2-classification step 1200/4800"."""
    who = f"{job['trigger']}, {job['requested_by']}" + (f": {job['reason']}" if job.get("reason") else "")
    text = f"#{job['id']} {job['status']} ({who})"
    if job["status"] in FINISHED:
        return text + (f" {job['outcome']}" if job.get("outcome") else "")
    p = job.get("progress") or {}
    if p.get("stage"):
        text += f" {p['stage']}"
        if p.get("of"):
            text += f" step {p.get('step', 0)}/{p['of']}"
    return text


def _finish(conn: psycopg.Connection, job_id: int, status: str, outcome: str, progress: dict | None = None) -> None:
    conn.execute("UPDATE training_jobs SET status = %s, outcome = %s, finished_at = now(),"
                 " progress = progress || %s::jsonb WHERE id = %s",
                 (status, outcome[:2000], json.dumps(progress or {}, default=str), job_id))


def reap_stale(conn: psycopg.Connection, keep: int | None = None) -> list[int]:
    """Fail the jobs no worker will finish; call only while holding the training lock (so nothing runs).

    A ``running`` row then belongs to a worker that died (OOM, kill -9, a lost node); a ``queued`` row older
    than ``MAX_WAIT_S`` lost its task message or has no worker serving the train queue."""
    rows = conn.execute(
        "UPDATE training_jobs SET status = 'failed', finished_at = now(), outcome = CASE WHEN status = 'running'"
        " THEN 'failed: its worker stopped before the job finished (nobody held the training lock)'"
        " ELSE 'failed: not started within ' || %s || ' h (task lost, or no worker serves the train queue)' END"
        " WHERE id IS DISTINCT FROM %s AND (status = 'running' OR (status = 'queued' AND"
        " created_at < now() - make_interval(secs => %s))) RETURNING id",
        (f"{MAX_WAIT_S / 3600:g}", keep, MAX_WAIT_S)).fetchall()
    ids = [r[0] for r in rows]
    if ids:
        log.warning("training jobs %s marked failed: their worker stopped or they never started", ids)
    return ids


# ---- sending jobs ---------------------------------------------------------------------------------------

def enqueue(job_id: int) -> None:
    """Send the job to the train queue by task name (training never imports the worker)."""
    from core import celery_app

    celery_app.app.send_task(celery_app.RETRAIN_TASK, args=[job_id], queue=celery_app.task_settings().train_queue)


def retrain_params(settings: Settings, preset: str | None = None, fresh: bool = False) -> dict:
    """The params of an admin's retraining job, as `enrich retrain` and the console ask for it: the preset
    (default ``settings.retrain_preset``) and, with ``fresh``, no warm start. ValueError for an unknown preset."""
    from training.config import PRESETS

    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return {"preset": preset or settings.retrain_preset, **({"warm_start": False} if fresh else {})}


def request_retrain(conn: psycopg.Connection, *, requested_by: str, reason: str, params: dict | None = None,
                    trigger: str = "admin", send: Callable[[int], None] = enqueue) -> int:
    """Create a queued job and send it (``conn`` must autocommit: the worker must see the row)."""
    job_id = create_job(conn, trigger=trigger, requested_by=requested_by, reason=reason, params=params)
    try:
        send(job_id)
    except Exception as exc:
        _finish(conn, job_id, "failed", f"failed: could not enqueue the job: {exc}")
        raise
    log.info("training job #%d queued by %s (%s): %s", job_id, requested_by, trigger, reason)
    return job_id


def corrections_since(conn: psycopg.Connection) -> tuple[int, datetime | None]:
    """Corrections received since the last job that trained (its start; None: no job has), and when that was.

    Skipped and failed jobs do not count: what they skipped or failed on still waits to be learnt."""
    since = conn.execute("SELECT max(coalesce(started_at, created_at)) FROM training_jobs"
                         " WHERE status = 'done'").fetchone()[0]
    if since is None:
        n = conn.execute("SELECT count(*) FROM corrections").fetchone()[0]
    else:
        n = conn.execute("SELECT count(*) FROM corrections WHERE received_at >= %s", (since,)).fetchone()[0]
    return int(n), since


def schedule_retrain(conn: psycopg.Connection, settings: Settings,
                     send: Callable[[int], None] = enqueue) -> dict:
    """Beat's periodic retrain: a queued job when at least ``settings.retrain_min_corrections`` corrections
    arrived since the last job that trained and no job is queued or running; otherwise a ``skipped`` row
    whose outcome says why (also logged). ``conn`` must autocommit. Returns {job, status, outcome}."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEDULE_LOCK_KEY,))
        if conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (LOCK_KEY,)).fetchone()[0]:
            reap_stale(conn)  # nothing runs: clear what dead workers left, or it would block every tick
        busy = conn.execute("SELECT id, status FROM training_jobs WHERE status IN ('queued', 'running')"
                            " ORDER BY id LIMIT 1").fetchone()
        n, since = corrections_since(conn)
        when = f"since {since:%Y-%m-%d %H:%M} UTC" if since else "in all (no job has trained yet)"
        outcome = None
        if busy is not None:
            outcome = f"skipped: job #{busy[0]} is still {busy[1]}"
        elif n < settings.retrain_min_corrections:
            outcome = (f"skipped: {n} correction(s) {when}, fewer than {settings.retrain_min_corrections} "
                       "(ENRICH_RETRAIN_MIN_CORRECTIONS)")
        reason = f"{n} correction(s) {when}"
        job_id = create_job(conn, trigger="schedule", requested_by=SCHEDULE_ACTOR, reason=reason,
                            status="skipped" if outcome else "queued", outcome=outcome)
    if outcome:
        log.info("scheduled retraining %s (job #%d)", outcome, job_id)
        return {"job": job_id, "status": "skipped", "outcome": outcome}
    try:
        send(job_id)  # after the commit: the worker must find the row
    except Exception as exc:
        _finish(conn, job_id, "failed", f"failed: could not enqueue the job: {exc}")
        raise
    log.info("scheduled retraining: job #%d queued (%s)", job_id, reason)
    return {"job": job_id, "status": "queued", "outcome": None}


# ---- running one ----------------------------------------------------------------------------------------

class _Progress:
    """Writes a job's progress into its row: stage changes at once, steps at most every PROGRESS_EVERY_S.
    Best effort: a failed write is logged and training goes on (the final status is written apart)."""

    def __init__(self, conn: psycopg.Connection, job_id: int) -> None:
        self.conn, self.job_id = conn, job_id
        self.facts: dict = {}  # job-level facts kept in every write (warm start, corrections, …)
        self.stage: str | None = None
        self.last = 0.0

    def note(self, **facts) -> None:
        self.facts.update(facts)
        self({"stage": self.stage or "starting"}, force=True)

    def __call__(self, update: dict, force: bool = False) -> None:
        now = time.monotonic()
        stage = update.get("stage")
        if not force and stage == self.stage and now - self.last < PROGRESS_EVERY_S:
            return
        self.stage, self.last = stage, now
        body = {**self.facts, **update, "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            self.conn.execute("UPDATE training_jobs SET progress = %s::jsonb WHERE id = %s",
                              (json.dumps(body, default=str), self.job_id))
        except psycopg.Error as exc:
            log.warning("job #%d: progress not recorded: %s", self.job_id, exc)


def job_config(params: dict, settings: Settings, job_id: int):
    """The TrainConfig of a job: its preset, dataset (and that dataset's taxonomy) and data directory (params,
    else the settings), models under ``settings.models_dir``, the worker's device and threads, a version
    naming the job."""
    from schemas.taxonomy import load_taxonomy
    from training.config import PRESETS

    preset = params.get("preset") or settings.retrain_preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    dataset = params.get("dataset") or settings.retrain_dataset
    overrides: dict = {"dataset": dataset, "out_dir": settings.models_dir, "progress": False}
    if dataset in _DATASET_TAXONOMY:  # the presets name FMNIST-shop's taxonomy
        overrides["taxonomy"] = _DATASET_TAXONOMY[dataset]
    elif dataset == "catalogue":
        overrides["catalogue_source"] = params.get("catalogue") or settings.retrain_catalogue
        taxonomy = params.get("taxonomy") or settings.retrain_taxonomy
        if not taxonomy:
            raise ValueError("a catalogue retraining job needs the catalogue's taxonomy: set ENRICH_RETRAIN_TAXONOMY "
                             "(a bundled name or a JSON file)")
        overrides["taxonomy"] = taxonomy
    data_dir = params.get("data_dir") or settings.retrain_data_dir
    if data_dir:
        overrides["data_dir"] = Path(data_dir)
    elif dataset == "deepfashion":
        raise ValueError("a DeepFashion retraining job needs its files: set ENRICH_RETRAIN_DATA_DIR to the root "
                         "holding category/ (and inshop/)")
    if params.get("time_budget_s"):
        overrides["time_budget_s"] = float(params["time_budget_s"])
    if settings.device != "auto":
        overrides["device"] = settings.device
    if settings.torch_threads:
        overrides["threads"] = settings.torch_threads
    if settings.retrain_task_weights:  # seed 002's per-task weights (noisy seller labels)
        overrides["seed_002_task_weights"] = True
    cfg = replace(PRESETS[preset], **overrides)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return replace(cfg, model_version=f"{load_taxonomy(cfg.taxonomy).name}-{cfg.backbone}-job{job_id}-{stamp}")


def evaluation_cfg(cfg):
    """The fixed evaluation set a job measures candidate and active model on: the test split the preset's
    own training run measures (dataset, data, taxonomy, seed, test items, photos per item)."""
    from training.config import TrainConfig

    return replace(TrainConfig(), **{k: getattr(cfg, k) for k in _EVAL_FIELDS})


def _warm_start(active_dir: Path | None, active_version: str | None, cfg, taxonomy) -> tuple[Path | None, str]:
    from model.checkpoint import read_manifest

    if active_dir is None:
        return None, "fresh weights: no active model"
    m = read_manifest(active_dir)
    misfit = [what for what, ok in (("backbone", m.backbone == cfg.backbone),
                                    ("embedding size", m.embedding_dim == cfg.embedding_dim),
                                    ("taxonomy", m.taxonomy_sha256 == taxonomy.sha256())) if not ok]
    if misfit:
        return None, f"fresh weights: the active {active_version} differs in {', '.join(misfit)}"
    return active_dir, f"from {active_version}"


def run_chain(conn: psycopg.Connection, job: dict, settings: Settings, progress: _Progress,
              train_model: Callable | None = None, send_backfill: Callable[[str], None] | None = None
              ) -> tuple[str, str]:
    """Train → evaluate → register → gate → promote or wait → backfill. Returns (model_version, outcome)."""
    from core.images import load_image
    from model.artifacts import store_from_settings
    from model.registry import active_model, compare, local_dir, promote, register_candidate
    from schemas.taxonomy import load_taxonomy
    from training.corrections import correction_labels, corrections_to_images
    from training.evaluate import evaluate_model_dir

    if train_model is None:
        from training.train import train as train_model
    if send_backfill is None:
        from core.celery_app import send_backfill
    params, job_id = job["params"], job["id"]
    cfg = job_config(params, settings, job_id)
    taxonomy = load_taxonomy(cfg.taxonomy)
    store = store_from_settings(settings)
    active = active_model(conn)
    active_dir = local_dir(active, store) if active is not None else None
    init_from, warm = None, "fresh weights: asked for"
    if params.get("warm_start", True):
        init_from, warm = _warm_start(active_dir, active.model_version if active else None, cfg, taxonomy)
    cfg = replace(cfg, init_from=init_from)
    progress.note(preset=params.get("preset") or settings.retrain_preset, dataset=cfg.dataset, warm_start=warm)

    extra, n_labels = None, 0
    if params.get("corrections", True):
        progress({"stage": "corrections"})
        labels = correction_labels(conn, taxonomy)
        n_labels = len(labels)
        if labels:
            extra = corrections_to_images(labels, taxonomy, lambda uri: load_image(uri, settings), cfg.image_size)
        progress.note(corrections=n_labels, correction_rows=len(extra) if extra is not None else 0)
    log.info("job #%d: training %s on %s (%s), %d corrected label(s)", job_id, cfg.model_version, cfg.dataset,
             warm, n_labels)
    model_dir = Path(train_model(cfg, extra, progress=progress))

    progress({"stage": "evaluate"})
    eval_cfg = evaluation_cfg(cfg)
    metrics = {cfg.model_version: evaluate_model_dir(model_dir, eval_cfg, device=settings.device, progress=False)}
    unmeasured = None
    if active is not None:
        try:
            metrics[active.model_version] = evaluate_model_dir(active_dir, eval_cfg, device=settings.device,
                                                               progress=False)
        except Exception as exc:  # another dataset or taxonomy, unreadable files: no comparison possible
            unmeasured = f"the active {active.model_version} cannot be measured on this evaluation set: {exc}"
            log.warning("job #%d: %s", job_id, unmeasured)
    shown = ("test/top1", "test/macro_f1", "test/recall@1")
    progress.note(metrics={v: {k: round(m[k], 4) for k in shown if k in m} for v, m in metrics.items()})

    progress({"stage": "register"})
    why = f"retraining job #{job_id}" + (f": {job['reason']}" if job["reason"] else "")
    row = register_candidate(conn, model_dir, store, actor=job["requested_by"], reason=why)
    version = row.model_version
    conn.execute("UPDATE training_jobs SET model_version = %s WHERE id = %s", (version, job_id))

    progress({"stage": "gate"})
    wait = f"waiting for an admin: enrich promote {version}"
    if active is None:
        verdict = "no active model yet"
    elif unmeasured:
        verdict = unmeasured
    else:
        ok, reasons = compare(metrics[version], metrics[active.model_version])
        verdict = f"passes the gate against {active.model_version}" if ok else \
            f"fails the gate against {active.model_version}: {'; '.join(reasons)}"
    if not settings.auto_promote:
        return version, f"{wait} ({verdict})"
    if unmeasured:  # never promote automatically what was not compared
        return version, f"{wait} (not promoted automatically: {verdict})"
    decision = promote(conn, version, metrics=metrics, actor=job["requested_by"], reason=why)
    if not decision.promoted:
        return version, "rejected by the gate: " + "; ".join(decision.reasons)
    try:
        send_backfill(version)
    except Exception as exc:  # the model is active: say so, and that the backfill must be sent again
        log.exception("job #%d: backfill of %s not enqueued", job_id, version)
        return version, (f"promoted {version} (previous: {decision.previous or 'none'}); the catalogue backfill "
                         f"was NOT enqueued ({exc}): enqueue it again")
    return version, f"promoted {version} (previous: {decision.previous or 'none'}); catalogue backfill enqueued"


def run_job(url: str, job_id: int, settings: Settings, *, train_model: Callable | None = None,
            send_backfill: Callable[[str], None] | None = None) -> dict:
    """Run a queued job to its end under the training lock; raises JobBusy when another job holds it.

    A job that is not queued any more (a duplicate delivery, already run or failed) is left as it is. A job
    that waited longer than ``MAX_WAIT_S`` for the lock fails instead of starting. Any error marks the job
    failed with the error (and is raised again). ``train_model`` and ``send_backfill``: for tests.
    Returns {job, status, model_version, outcome, ran}."""
    from core.db import connect

    conn = connect(url, autocommit=True)
    try:
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]:
            return _busy(conn, job_id)
        try:
            reap_stale(conn, keep=job_id)
            with conn.cursor(row_factory=dict_row) as cur:
                cur.execute("UPDATE training_jobs SET status = 'running', started_at = now(),"
                            " progress = '{\"stage\": \"starting\"}'::jsonb"
                            f" WHERE id = %s AND status = 'queued' RETURNING {_COLUMNS}", (job_id,))
                job = cur.fetchone()
            if job is None:
                now = get_job(conn, job_id)
                log.info("training job #%d is %s: nothing to run", job_id, now["status"] if now else "unknown")
                return {"job": job_id, "status": now["status"] if now else None, "ran": False,
                        "model_version": now and now["model_version"], "outcome": now and now["outcome"]}
            log.info("training job #%d started (%s, %s: %s)", job_id, job["trigger"], job["requested_by"],
                     job["reason"])
            progress = _Progress(conn, job_id)
            try:
                version, outcome = run_chain(conn, job, settings, progress, train_model, send_backfill)
            except BaseException as exc:  # also a soft time limit or a worker's shutdown
                _finish_anyhow(conn, url, job_id, "failed", f"failed: {type(exc).__name__}: {exc}",
                               {"stage": "failed at " + (progress.stage or "start")})
                log.exception("training job #%d failed", job_id)
                raise
            _finish_anyhow(conn, url, job_id, "done", outcome, {"stage": "done"})
            log.info("training job #%d done: %s", job_id, outcome)
            return {"job": job_id, "status": "done", "model_version": version, "outcome": outcome, "ran": True}
        finally:
            try:
                conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
            except psycopg.Error:
                pass  # a lost connection: the server released the lock with the session
    finally:
        conn.close()  # also releases the lock if the unlock could not run


def _busy(conn: psycopg.Connection, job_id: int) -> dict:
    row = conn.execute("SELECT status, now() - created_at > make_interval(secs => %s) FROM training_jobs"
                       " WHERE id = %s", (MAX_WAIT_S, job_id)).fetchone()
    if row is None or row[0] != "queued":
        return {"job": job_id, "status": row[0] if row else None, "ran": False, "model_version": None,
                "outcome": None}
    if row[1]:
        outcome = f"failed: another training job held the lock for more than {MAX_WAIT_S / 3600:g} h"
        _finish(conn, job_id, "failed", outcome)
        log.warning("training job #%d: %s", job_id, outcome)
        return {"job": job_id, "status": "failed", "ran": False, "model_version": None, "outcome": outcome}
    holder = conn.execute("SELECT id FROM training_jobs WHERE status = 'running' ORDER BY id LIMIT 1").fetchone()
    waiting = {"stage": "waiting for the lock", "behind": holder[0] if holder else None,
               "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    conn.execute("UPDATE training_jobs SET progress = %s::jsonb WHERE id = %s AND status = 'queued'",
                 (json.dumps(waiting), job_id))
    raise JobBusy(f"training job #{job_id} waits: " + (f"job #{holder[0]} is running" if holder
                                                        else "another process holds the training lock"))


def _finish_anyhow(conn: psycopg.Connection, url: str, job_id: int, status: str, outcome: str,
                   progress: dict) -> None:
    """Record the end even when the job's connection was lost during hours of training."""
    from core.db import connect

    try:
        _finish(conn, job_id, status, outcome, progress)
        return
    except psycopg.OperationalError as exc:
        log.warning("job #%d: connection lost (%s); recording the end on a new one", job_id, exc)
    with connect(url, autocommit=True) as fresh:
        _finish(fresh, job_id, status, outcome, progress)
