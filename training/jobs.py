"""Retraining jobs (table ``training_jobs``): the rows, the one-at-a-time lock, and the chain a job runs.

The chain: train (``ENRICH_RETRAIN_PRESET`` on ``ENRICH_RETRAIN_DATASET`` plus the corrected labels, as
``enrich train --with-corrections`` does; warm start from the active model's weights where its backbone,
embedding size and taxonomy fit the preset) → measure the candidate and the active model on one fixed
evaluation set → register the candidate (artifact store; who and why from the job; its lineage in the
manifest) → the gate (training.gate: a failing candidate is rejected, with the reasons) → promote when it
passes and ``ENRICH_AUTO_PROMOTE``, else wait for an admin (``enrich promote VERSION``) → after a promotion,
enqueue the catalogue backfill by task name (the backfill enqueues the reindex when it is done). With
``ENRICH_RETRAIN_NPROC`` N > 1 the training step runs in N processes under torchrun (``training.processes``).

One job trains at a time: a session-level Postgres advisory lock, taken with ``pg_try_advisory_lock`` on
the job's connection and held for the whole run. A job that finds it taken stays ``queued`` (progress
"waiting for the lock") and ``run_job`` raises ``JobBusy``; its Celery task retries later. A ``running``
row while nobody holds the lock belongs to a worker that died: the next job (or beat tick, or a train
worker's start) marks it failed. A running job also beats: a thread with its own connection sets
``heartbeat_at`` every ``ENRICH_JOB_HEARTBEAT_S``, whatever training reports; a running job silent for longer
than ``ENRICH_JOB_STALE_S`` is marked failed by whoever looks first (``job_progress``, beat, a worker's start),
lock or not. An admin cancels a job (``cancel_job``): a queued one at once, a running one at its next training
step or stage (the heartbeat sees the request). Plain functions; ``training.tasks`` wraps them as Celery
tasks and ``enrich retrain`` creates jobs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import class_row, dict_row

from core import celery_app
from core.config import Settings
from core.db import connect
from core.images import load_image
from core.rows import fetch_value, fetch_values
from model.artifacts import store_from_settings
from model.manifest import read_manifest, record_lineage
from model.registry import active_model, local_dir, register_candidate
from schemas.taxonomy import Taxonomy, load_taxonomy
from training import gate
from training.config import CATALOGUE_LABEL_LOSS, PRESETS, TrainConfig
from training.corrections import correction_labels, corrections_to_images
from training.eval_sets import DATASET_TAXONOMY
from training.processes import train_processes
from training.train import train

log = logging.getLogger(__name__)

LOCK_KEY = 7_402_114  # pg advisory lock: the one running training job (registry promotions use 7_402_113)
SCHEDULE_LOCK_KEY = 7_402_115  # serialises beat ticks (two beats by mistake still create one job)
MAX_WAIT_S = 6 * 3600.0  # a job still queued this long after it was created fails instead of starting
PROGRESS_EVERY_S = 2.0  # progress is written to the row at most this often (stage changes at once)
FINISHED = ("done", "failed", "skipped", "cancelled")
# what a job's params may set (everything else comes from the settings of the worker that runs it)
PARAM_KEYS = ("preset", "dataset", "data_dir", "warm_start", "corrections", "time_budget_s")
SCHEDULE_ACTOR = "schedule"
_COLUMNS = ("id, status, trigger, requested_by, reason, params, progress, model_version, outcome, created_at,"
            " started_at, finished_at, heartbeat_at, cancel_requested_by")


@dataclass(frozen=True)
class _JobState:
    """Where a job stands, as the lock and the schedule look at it."""
    id: int
    status: str
    overdue: bool = False  # queued for longer than MAX_WAIT_S


class JobBusy(RuntimeError):
    """Another training job holds the lock: this one stays queued; try again later."""


class JobCancelled(Exception):
    """The running job is to stop: an admin cancelled it (``by``), or its row was ended elsewhere (``by`` None)."""

    def __init__(self, message: str, by: str | None = None) -> None:
        super().__init__(message)
        self.by = by


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
    return int(fetch_value(
        conn, "INSERT INTO training_jobs (status, trigger, requested_by, reason, params, outcome, finished_at)"
        " VALUES (%s, %s, %s, %s, %s::jsonb, %s, CASE WHEN %s = 'skipped' THEN now() END) RETURNING id",
        (status, trigger, requested_by, reason, json.dumps(params, default=str), outcome, status)))


def get_job(conn: psycopg.Connection, job_id: int) -> dict | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM training_jobs WHERE id = %s", (job_id,))
        return cur.fetchone()


def job_progress(conn: psycopg.Connection, limit: int = 10, stale_s: float | None = None) -> list[dict]:
    """The latest ``limit`` jobs and every queued or running one, newest first: the row's columns (id,
    status, trigger, requested_by, reason, params, progress {stage, step, of, …}, model_version, outcome,
    created_at, started_at, finished_at, heartbeat_at, cancel_requested_by) plus ``summary``, one line saying
    where the job is. Running jobs silent for longer than ``stale_s`` (ENRICH_JOB_STALE_S; None: its default)
    are marked failed first (``reap_silent``), so a dead job is never shown running."""
    reap_silent(conn, Settings.model_fields["job_stale_s"].default if stale_s is None else stale_s)
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM training_jobs WHERE status IN ('queued', 'running')"
                    " OR id IN (SELECT id FROM training_jobs ORDER BY id DESC LIMIT %s) ORDER BY id DESC", (limit,))
        rows = cur.fetchall()
    for r in rows:
        r["summary"] = describe(r)
    return rows


def describe(job: dict, now: datetime | None = None, age: bool = True) -> str:
    """One line: "#7 running (admin, alice: new corrections) 2-classification step 1200/4800, 12 s ago": a
    running job's last sign of life (heartbeat, progress or start; with ``age``), and "cancelling (asked by …)"
    once an admin cancelled it."""
    who = f"{job['trigger']}, {job['requested_by']}" + (f": {job['reason']}" if job.get("reason") else "")
    text = f"#{job['id']} {job['status']} ({who})"
    if job["status"] in FINISHED:
        return text + (f" {job['outcome']}" if job.get("outcome") else "")
    p = job.get("progress") or {}
    if p.get("stage"):
        text += f" {p['stage']}"
        if p.get("of"):
            text += f" step {p.get('step', 0)}/{p['of']}"
    heard = _last_heard(job) if age and job["status"] == "running" else None
    if heard is not None:
        text += f", {_ago((now or datetime.now(UTC)) - heard)}"
    if job["status"] == "running" and job.get("cancel_requested_by"):
        text += f"; cancelling (asked by {job['cancel_requested_by']})"
    return text


def _last_heard(job: dict) -> datetime | None:
    """The latest of the job's heartbeat, progress write and start."""
    times: list[datetime] = [t for t in (job.get("heartbeat_at"), job.get("started_at")) if t is not None]
    stamp = (job.get("progress") or {}).get("updated_at")
    if stamp:
        try:
            times.append(datetime.fromisoformat(stamp))
        except ValueError:
            pass  # a hand-written row: the other times still tell
    return max(times) if times else None


def _ago(delta: timedelta) -> str:
    s = max(0, int(delta.total_seconds()))
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago" if s < 7200 else f"{s // 3600} h ago"


def _finish(conn: psycopg.Connection, job_id: int, status: str, outcome: str, progress: dict | None = None) -> None:
    conn.execute("UPDATE training_jobs SET status = %s, outcome = %s, finished_at = now(),"
                 " progress = progress || %s::jsonb WHERE id = %s",
                 (status, outcome[:2000], json.dumps(progress or {}, default=str), job_id))


def reap_stale(conn: psycopg.Connection, keep: int | None = None) -> list[int]:
    """Fail the jobs no worker will finish; call only while holding the training lock (so nothing runs).

    A ``running`` row then belongs to a worker that died (OOM, kill -9, a lost node); a ``queued`` row older
    than ``MAX_WAIT_S`` lost its task message or has no worker serving the train queue."""
    ids = fetch_values(
        conn, "UPDATE training_jobs SET status = 'failed', finished_at = now(), outcome = CASE WHEN status = 'running'"
        " THEN 'failed: its worker stopped before the job finished (nobody held the training lock)'"
        " ELSE 'failed: not started within ' || %s || ' h (task lost, or no worker serves the train queue)' END,"
        " progress = CASE WHEN status = 'running' THEN progress || jsonb_build_object('stage', 'failed at '"
        " || coalesce(progress->>'stage', 'start')) ELSE progress END"
        " WHERE id IS DISTINCT FROM %s AND (status = 'running' OR (status = 'queued' AND"
        " created_at < now() - make_interval(secs => %s))) RETURNING id",
        (f"{MAX_WAIT_S / 3600:g}", keep, MAX_WAIT_S))
    if ids:
        log.warning("training jobs %s marked failed: their worker stopped or they never started", ids)
    return ids


def reap_silent(conn: psycopg.Connection, stale_s: float) -> list[int]:
    """Fail the running jobs that gave no sign of life (heartbeat, else their start) for more than ``stale_s``:
    their worker died (killed, out of memory, its machine lost — which may keep its Postgres session, and the
    lock, for hours). Safe at any time, lock or not: a live job beats every ENRICH_JOB_HEARTBEAT_S."""
    ids = fetch_values(
        conn, "UPDATE training_jobs SET status = 'failed', finished_at = now(), outcome = 'failed: no heartbeat for '"
        " || round(extract(epoch FROM now() - coalesce(heartbeat_at, started_at, created_at)))::bigint"
        " || ' s — its worker died (killed, out of memory or its machine lost; ENRICH_JOB_STALE_S is '"
        " || %s || ' s)', progress = progress || jsonb_build_object('stage', 'failed at '"
        " || coalesce(progress->>'stage', 'start')) WHERE status = 'running'"
        " AND coalesce(heartbeat_at, started_at, created_at) < now() - make_interval(secs => %s) RETURNING id",
        (f"{stale_s:g}", stale_s))
    if ids:
        log.warning("training jobs %s marked failed: no heartbeat for more than %gs", ids, stale_s)
    return ids


def reap_dead(conn: psycopg.Connection, stale_s: float) -> list[int]:
    """What a train worker's start does: fail the silent jobs (``reap_silent``) and, when the training lock is
    free (so nothing runs), every running one and the queued ones too old to start (``reap_stale``)."""
    ids = reap_silent(conn, stale_s)
    if fetch_value(conn, "SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)):
        try:
            ids += reap_stale(conn)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    return ids


def cancel_job(conn: psycopg.Connection, job_id: int, by: str) -> str:
    """Cancel a job, as `enrich retrain --cancel` and the console's button do. A queued one becomes 'cancelled'
    at once (its task, when delivered, runs nothing); a running one records ``cancel_requested_by``: its
    heartbeat sees it and the job stops at its next training step or stage, ending 'cancelled' without
    registering the model it had not registered yet. Returns the status now ('cancelled' or 'running').
    LookupError: no such job; ValueError: it has finished, nothing to cancel."""
    status = fetch_value(
        conn, "UPDATE training_jobs SET cancel_requested_by = coalesce(cancel_requested_by, %s),"
        " status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,"
        " finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,"
        " outcome = CASE WHEN status = 'queued' THEN 'cancelled by ' || %s || ' before it started' ELSE outcome END"
        " WHERE id = %s AND status IN ('queued', 'running') RETURNING status", (by, by, job_id))
    if status is None:
        job = get_job(conn, job_id)
        if job is None:
            raise LookupError(f"no training job #{job_id}")
        raise ValueError(f"job #{job_id} is already {job['status']}: nothing to cancel")
    log.info("training job #%d: cancelled by %s (%s)", job_id, by, "at once" if status == "cancelled"
             else "it stops at its next step")
    return str(status)


# ---- sending jobs ---------------------------------------------------------------------------------------

def enqueue(job_id: int) -> None:
    """Send the job to the train queue by task name (training never imports the worker)."""
    celery_app.app.send_task(celery_app.RETRAIN_TASK, args=[job_id], queue=celery_app.task_settings().train_queue)


def retrain_params(settings: Settings, preset: str | None = None, fresh: bool = False) -> dict:
    """The params of an admin's retraining job, as `enrich retrain` and the console ask for it: the preset
    (default ``settings.retrain_preset``) and, with ``fresh``, no warm start. ValueError for an unknown preset."""
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
    since = fetch_value(conn, "SELECT max(coalesce(started_at, created_at)) FROM training_jobs WHERE status = 'done'")
    if since is None:
        n = fetch_value(conn, "SELECT count(*) FROM corrections")
    else:
        n = fetch_value(conn, "SELECT count(*) FROM corrections WHERE received_at >= %s", (since,))
    return int(n), since


def schedule_retrain(conn: psycopg.Connection, settings: Settings,
                     send: Callable[[int], None] = enqueue) -> dict:
    """Beat's periodic retrain: a queued job when at least ``settings.retrain_min_corrections`` corrections
    arrived since the last job that trained and no job is queued or running; otherwise a ``skipped`` row
    whose outcome says why (also logged). ``conn`` must autocommit. Returns {job, status, outcome}."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEDULE_LOCK_KEY,))
        reap_silent(conn, settings.job_stale_s)  # a silent job is dead even while its session holds the lock
        if fetch_value(conn, "SELECT pg_try_advisory_xact_lock(%s)", (LOCK_KEY,)):
            reap_stale(conn)  # nothing runs: clear what dead workers left, or it would block every tick
        with conn.cursor(row_factory=class_row(_JobState)) as cur:
            busy = cur.execute("SELECT id, status FROM training_jobs WHERE status IN ('queued', 'running')"
                               " ORDER BY id LIMIT 1").fetchone()
        n, since = corrections_since(conn)
        when = f"since {since:%Y-%m-%d %H:%M} UTC" if since else "in all (no job has trained yet)"
        outcome = None
        if busy is not None:
            outcome = f"skipped: job #{busy.id} is still {busy.status}"
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

class _Heartbeat:
    """Proves a running job is alive: a daemon thread sets ``heartbeat_at`` every ``every_s`` on a connection
    of its own, whatever training reports (evaluation may report nothing for minutes). It also sees the job
    cancelled (``cancel_requested_by``) or its row ended elsewhere, and sets ``stop`` for ``_Progress``."""

    def __init__(self, url: str, job_id: int, every_s: float) -> None:
        self.url, self.job_id, self.every_s = url, job_id, every_s
        self.stop = threading.Event()  # the job is to stop; ``why`` and ``by`` say why and who asked
        self.why, self.by = "", None
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"training-job-{job_id}-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = None
        while not self._quit.wait(self.every_s):  # run_job wrote the first beat with the 'running' status
            try:
                conn = conn or connect(self.url, autocommit=True)
                self._beat(conn)
            except Exception as exc:
                log.warning("job #%d: heartbeat not recorded: %s", self.job_id, exc)
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _beat(self, conn: psycopg.Connection) -> None:
        row = conn.execute("UPDATE training_jobs SET heartbeat_at = CASE WHEN status = 'running' THEN now()"
                           " ELSE heartbeat_at END WHERE id = %s RETURNING status, cancel_requested_by",
                           (self.job_id,)).fetchone()
        status, by = row if row is not None else (None, None)
        if status == "running" and by is None:
            return
        if status == "running":
            self.why, self.by = f"cancelled by {by}", by
        else:  # marked failed meanwhile (no heartbeat for too long), or deleted: its end is written already
            self.why = f"the job is {status or 'gone'} already"
        self.stop.set()

    def close(self) -> None:
        self._quit.set()
        self._thread.join(timeout=30)


class _Progress:
    """Writes a job's progress into its row: stage changes at once, steps at most every PROGRESS_EVERY_S.
    Best effort: a failed write is logged and training goes on (the final status is written apart).
    Raises JobCancelled once ``heartbeat`` saw the job cancelled: training calls it on its steps and stages,
    and the chain between its steps, so the job stops at the next one."""

    def __init__(self, conn: psycopg.Connection, job_id: int, heartbeat: _Heartbeat | None = None) -> None:
        self.conn, self.job_id, self.heartbeat = conn, job_id, heartbeat
        self.facts: dict = {}  # job-level facts kept in every write (warm start, corrections, …)
        self.stage: str | None = None
        self.last = 0.0

    def note(self, **facts) -> None:
        self.facts.update(facts)
        self({"stage": self.stage or "starting"}, force=True)

    def __call__(self, update: dict, force: bool = False) -> None:
        if self.heartbeat is not None and self.heartbeat.stop.is_set():
            raise JobCancelled(self.heartbeat.why, self.heartbeat.by)
        now = time.monotonic()
        stage = update.get("stage")
        if not force and stage == self.stage and now - self.last < PROGRESS_EVERY_S:
            return
        self.stage, self.last = stage, now
        body = {**self.facts, **update, "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
        try:
            self.conn.execute("UPDATE training_jobs SET progress = %s::jsonb WHERE id = %s",
                              (json.dumps(body, default=str), self.job_id))
        except psycopg.Error as exc:
            log.warning("job #%d: progress not recorded: %s", self.job_id, exc)


def job_config(params: dict, settings: Settings, job_id: int) -> TrainConfig:
    """The TrainConfig of a job: its preset, dataset (and that dataset's taxonomy) and data directory (params,
    else the settings), models under ``settings.models_dir``, the worker's device and threads, a version
    naming the job."""
    preset = params.get("preset") or settings.retrain_preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    dataset = params.get("dataset") or settings.retrain_dataset
    overrides: dict[str, Any] = {"dataset": dataset, "out_dir": settings.models_dir, "progress": False}
    if dataset in DATASET_TAXONOMY:  # the presets name FMNIST-shop's taxonomy
        overrides["taxonomy"] = DATASET_TAXONOMY[dataset]
    elif dataset == "catalogue":
        overrides["catalogue_source"] = params.get("catalogue") or settings.retrain_catalogue
        taxonomy = params.get("taxonomy") or settings.retrain_taxonomy
        if not taxonomy:
            raise ValueError("a catalogue retraining job needs the catalogue's taxonomy: set ENRICH_RETRAIN_TAXONOMY "
                             "(a bundled name or a JSON file)")
        overrides["taxonomy"] = taxonomy
        overrides["label_loss"] = CATALOGUE_LABEL_LOSS  # seller labels are noisy
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
    if settings.retrain_task_weights:  # per-group loss weights from label counts (noisy seller labels)
        overrides["task_weights"] = True
    cfg = replace(PRESETS[preset], **overrides)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return replace(cfg, model_version=f"{load_taxonomy(cfg.taxonomy).name}-{cfg.backbone}-job{job_id}-{stamp}")


def _warm_start(active_dir: Path | None, active_version: str | None, cfg: TrainConfig,
                taxonomy: Taxonomy) -> tuple[Path | None, str]:
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
    """Train → evaluate → register → gate (training.gate: a failing candidate is rejected) → promote or wait
    → backfill. Returns (model_version, outcome); the outcome says promoted, rejected (why) or waiting."""
    if train_model is None and settings.retrain_nproc > 1:  # DistributedDataParallel under torchrun
        train_model = partial(train_processes, nproc=settings.retrain_nproc, settings=settings)
    elif train_model is None:
        train_model = partial(train, settings=settings)
    if send_backfill is None:
        send_backfill = celery_app.send_backfill
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

    extra, labels = None, []
    if params.get("corrections", True):
        progress({"stage": "corrections"})
        # the held-out share never reaches training: the gate measures candidates on it
        labels = correction_labels(conn, taxonomy, holdout="train", share=settings.corrections_holdout)
        held = len(correction_labels(conn, taxonomy, holdout="eval", share=settings.corrections_holdout))
        if labels:
            extra = corrections_to_images(labels, taxonomy, lambda uri: load_image(uri, settings), cfg.image_size)
        progress.note(corrections=len(labels), correction_rows=len(extra) if extra is not None else 0,
                      held_out=held)
    log.info("job #%d: training %s on %s (%s), %d corrected label(s)", job_id, cfg.model_version, cfg.dataset,
             warm, len(labels))
    model_dir = Path(train_model(cfg, extra, progress=progress))
    # lineage: the job, and which corrections it learnt (a digest of the labels, in a stable order)
    learnt = sorted(f"{lab.listing_id}\t{lab.group}\t{lab.value}" for lab in labels)
    record_lineage(model_dir, job=job_id, corrections=len(labels),
                   corrections_through=max((lab.corrected_at for lab in labels), default=None),
                   corrections_sha256=hashlib.sha256("\n".join(learnt).encode()).hexdigest() if labels else "")

    progress({"stage": "evaluate"})  # both on the candidate's fixed evaluation set
    measured = gate.measure(model_dir, active_dir, device=settings.device, settings=settings)
    shown = ("test/top1", "test/macro_f1", "test/recall@1")
    progress.note(metrics={v: {k: round(m[k], 4) for k in shown if k in m} for v, m in measured.metrics.items()})

    progress({"stage": "register"})
    why = f"retraining job #{job_id}" + (f": {job['reason']}" if job["reason"] else "")
    row = register_candidate(conn, model_dir, store, actor=job["requested_by"], reason=why)
    version = row.model_version
    conn.execute("UPDATE training_jobs SET model_version = %s WHERE id = %s", (version, job_id))

    progress({"stage": "gate"})
    decision = gate.promote(conn, version, settings, actor=job["requested_by"], reason=why, measured=measured,
                            activate=settings.auto_promote, store=store)
    against = f" against {decision.previous}" if decision.previous else ""
    if decision.status == "rejected":
        return version, (f"rejected by the gate{against} (an admin may reconsider it: enrich models unreject "
                         f"{version} --reason …): {'; '.join(decision.reasons)}")
    if not decision.promoted:
        verdict = decision.details.get("gate", {})
        if verdict.get("outcome") == gate.REFUSED:
            state = f"not compared{against}: {'; '.join(decision.reasons)}"
        else:
            state = f"passes the gate{against}" if decision.previous else "no active model yet"
        return version, f"waiting for an admin: enrich promote {version} ({state})"
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

    A job that is not queued any more (a duplicate delivery, already run, failed or cancelled) is left as it
    is. A job that waited longer than ``MAX_WAIT_S`` for the lock fails instead of starting. While it runs, a
    ``_Heartbeat`` beats every ``settings.job_heartbeat_s``; a job cancelled meanwhile stops at its next step
    and ends 'cancelled' (returned, not raised). Any error marks the job failed with the error (and is raised
    again). ``train_model`` and ``send_backfill``: for tests.
    Returns {job, status, model_version, outcome, ran}."""
    conn = connect(url, autocommit=True)
    try:
        if not fetch_value(conn, "SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)):
            return _busy(conn, job_id)
        try:
            reap_stale(conn, keep=job_id)
            with conn.cursor(row_factory=dict_row) as cur:
                cur.execute("UPDATE training_jobs SET status = 'running', started_at = now(), heartbeat_at = now(),"
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
            heartbeat = _Heartbeat(url, job_id, settings.job_heartbeat_s)
            progress = _Progress(conn, job_id, heartbeat)
            try:
                version, outcome = run_chain(conn, job, settings, progress, train_model, send_backfill)
            except JobCancelled as exc:
                return _cancelled(conn, url, job_id, progress.stage, exc)
            except BaseException as exc:  # also a soft time limit or a worker's shutdown
                _finish_anyhow(conn, url, job_id, "failed", f"failed: {type(exc).__name__}: {exc}",
                               {"stage": "failed at " + (progress.stage or "start")})
                log.exception("training job #%d failed", job_id)
                raise
            finally:
                heartbeat.close()
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


def _cancelled(conn: psycopg.Connection, url: str, job_id: int, stage: str | None, exc: JobCancelled) -> dict:
    """Record the end of a job stopped by a cancellation (a row ended elsewhere keeps its end)."""
    job = get_job(conn, job_id)
    version = job["model_version"] if job else None
    if exc.by is None:
        log.warning("training job #%d stopped: %s", job_id, exc)
        return {"job": job_id, "status": job and job["status"], "model_version": version,
                "outcome": job and job["outcome"], "ran": True}
    at = stage or "start"
    outcome = f"cancelled by {exc.by} at {at}" + (f"; its candidate {version} stays registered" if version else "")
    _finish_anyhow(conn, url, job_id, "cancelled", outcome, {"stage": f"cancelled at {at}"})
    log.info("training job #%d %s", job_id, outcome)
    return {"job": job_id, "status": "cancelled", "model_version": version, "outcome": outcome, "ran": True}


def _busy(conn: psycopg.Connection, job_id: int) -> dict:
    with conn.cursor(row_factory=class_row(_JobState)) as cur:
        job = cur.execute("SELECT id, status, now() - created_at > make_interval(secs => %s) AS overdue"
                          " FROM training_jobs WHERE id = %s", (MAX_WAIT_S, job_id)).fetchone()
    if job is None or job.status != "queued":
        return {"job": job_id, "status": job.status if job else None, "ran": False, "model_version": None,
                "outcome": None}
    if job.overdue:
        outcome = f"failed: another training job held the lock for more than {MAX_WAIT_S / 3600:g} h"
        _finish(conn, job_id, "failed", outcome)
        log.warning("training job #%d: %s", job_id, outcome)
        return {"job": job_id, "status": "failed", "ran": False, "model_version": None, "outcome": outcome}
    holder = fetch_value(conn, "SELECT id FROM training_jobs WHERE status = 'running' ORDER BY id LIMIT 1")
    waiting = {"stage": "waiting for the lock", "behind": holder,
               "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
    conn.execute("UPDATE training_jobs SET progress = %s::jsonb WHERE id = %s AND status = 'queued'",
                 (json.dumps(waiting), job_id))
    raise JobBusy(f"training job #{job_id} waits: " + (f"job #{holder} is running" if holder is not None
                                                        else "another process holds the training lock"))


def _finish_anyhow(conn: psycopg.Connection, url: str, job_id: int, status: str, outcome: str,
                   progress: dict) -> None:
    """Record the end even when the job's connection was lost during hours of training."""
    try:
        _finish(conn, job_id, status, outcome, progress)
        return
    except psycopg.OperationalError as exc:
        log.warning("job #%d: connection lost (%s); recording the end on a new one", job_id, exc)
    with connect(url, autocommit=True) as fresh:
        _finish(fresh, job_id, status, outcome, progress)
