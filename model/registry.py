"""Model registry in Postgres (table `models`): immutable versions, an "active" alias that moves.

The registry makes the moves and keeps their history; it does not judge models. Whether a candidate may
replace the active model is the gate's decision (training/gate.py: `enrich promote`, the console and
retraining jobs all go through it), taken inside ``locked`` and carried out with ``activate``, ``reject`` or
``record``. The promotion lock (a transaction-level advisory lock) serialises every move, and the partial
unique index `models_one_active` guarantees at most one active row even so. A version that was active
before can be made active again without the gate (`rollback`); an admin can put a rejected candidate back
(`unreject`). Every move is kept in `model_events` with who and why, and the gate's verdict in its details.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import DictRow, class_row, dict_row
from pydantic import ValidationError

from core import celery_app
from core.config import Settings
from model.artifacts import ArtifactStore
from model.manifest import ModelMismatchError, read_manifest
from schemas.taxonomy import Taxonomy

log = logging.getLogger(__name__)

_LOCK_KEY = 7_402_113  # pg_advisory_xact_lock key serialising promotions


@dataclass
class ModelRow:
    model_version: str
    path: str
    status: str
    metrics: dict[str, float]
    created_at: datetime
    promoted_at: datetime | None
    artifact_uri: str | None = None
    sha256: str | None = None
    was_active: bool = False
    registered_by: str | None = None
    reason: str | None = None
    data_fingerprint: str | None = None
    eval_set: str | None = None  # the fixed evaluation set its stored metrics were measured on
    lineage: dict[str, Any] = field(default_factory=dict)  # the manifest's: job, started_from, corrections, …


_COLUMNS = ("model_version, path, status, metrics, created_at, promoted_at, artifact_uri, sha256, was_active,"
            " registered_by, reason, manifest->>'data_fingerprint' AS data_fingerprint,"
            " manifest->>'eval_set' AS eval_set, manifest->'lineage' AS lineage")


@dataclass
class Decision:
    promoted: bool
    candidate: str
    previous: str | None  # the active model before (when promoted) or compared with
    reasons: list[str] = field(default_factory=list)  # why not (or what was compared)
    status: str | None = None  # the candidate's status afterwards
    details: dict[str, Any] = field(default_factory=dict)  # what was recorded with the event (the gate's verdict)


@dataclass(frozen=True)
class Move:
    """One recorded move of the alias (a row of model_events)."""
    model_version: str
    action: str  # register, promote, rollback, reject, unreject, shadow, unshadow or gate
    previous: str | None  # the active model before the move
    actor: str
    reason: str
    details: dict[str, Any]  # what was recorded with it (the gate's verdict under "gate")
    at: datetime


@dataclass(frozen=True)
class Verdict:
    """The gate's verdict as recorded with an event."""
    id: int
    model_version: str
    action: str
    previous: str | None
    actor: str
    reason: str
    gate: dict[str, Any]  # the verdict (training/gate.py)
    at: datetime


def _row(r: DictRow) -> ModelRow:
    return ModelRow(r["model_version"], r["path"], r["status"], dict(r["metrics"] or {}), r["created_at"],
                    r["promoted_at"], r["artifact_uri"], r["sha256"], r["was_active"], r["registered_by"],
                    r["reason"], r["data_fingerprint"], r["eval_set"] or None, dict(r["lineage"] or {}))


def record(conn: psycopg.Connection, model_version: str, action: str, actor: str, reason: str,
           previous: str | None = None, details: dict[str, Any] | None = None) -> None:
    """Append to model_events (actions: register, promote, rollback, reject, unreject, shadow, unshadow, and
    gate: a verdict that moved nothing)."""
    conn.execute("INSERT INTO model_events (model_version, action, previous, actor, reason, details)"
                 " VALUES (%s, %s, %s, %s, %s, %s::jsonb)",
                 (model_version, action, previous, actor, reason, json.dumps(details or {}, default=str)))


def register_candidate(conn: psycopg.Connection, model_dir: Path | str, store: ArtifactStore | None = None, *,
                       actor: str = "cli", reason: str = "") -> ModelRow:
    """Insert the model directory's manifest as a candidate (idempotent on model_version).

    With an ArtifactStore the files are stored by version and sha256 first, and the row points there.
    """
    model_dir = Path(model_dir).resolve()
    manifest = read_manifest(model_dir)
    uri = sha = None
    if store is not None:
        uri, sha = store.put(model_dir)
    path = uri if uri is not None and not uri.startswith("s3://") else str(model_dir)
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "INSERT INTO models (model_version, manifest, metrics, path, status, artifact_uri, sha256,"
            " registered_by, reason) VALUES (%s, %s::jsonb, %s::jsonb, %s, 'candidate', %s, %s, %s, %s)"
            " ON CONFLICT (model_version) DO UPDATE SET path = EXCLUDED.path,"
            " artifact_uri = coalesce(EXCLUDED.artifact_uri, models.artifact_uri),"
            " sha256 = coalesce(EXCLUDED.sha256, models.sha256)"
            f" RETURNING {_COLUMNS}",
            (manifest.model_version, manifest.model_dump_json(), json.dumps(manifest.metrics), path, uri, sha,
             actor, reason),
        )
        inserted = cur.fetchone()
        if inserted is None:  # INSERT … ON CONFLICT DO UPDATE … RETURNING gives a row either way
            raise RuntimeError(f"registering {manifest.model_version} returned no row")
        row = _row(inserted)
        record(conn, row.model_version, "register", actor, reason, details={"artifact_uri": uri})
    log.info("registered %s (%s) from %s", row.model_version, row.status, model_dir)
    return row


def get_model(conn: psycopg.Connection, model_version: str) -> ModelRow | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM models WHERE model_version = %s", (model_version,))
        r = cur.fetchone()
    return _row(r) if r else None


def active_model(conn: psycopg.Connection) -> ModelRow | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM models WHERE status = 'active'")
        r = cur.fetchone()
    return _row(r) if r else None


def active_version(conn: psycopg.Connection) -> str | None:
    """The cheap check a worker makes before a task."""
    r = conn.execute("SELECT model_version FROM models WHERE status = 'active'").fetchone()
    return r[0] if r else None


@lru_cache(maxsize=16)
def _parse_taxonomy(text: str) -> Taxonomy:
    return Taxonomy.model_validate_json(text)


def taxonomy_of(conn: psycopg.Connection, model_version: str | None = None) -> Taxonomy | None:
    """The taxonomy of this model version (its manifest), else the active model's; None when neither."""
    row = conn.execute(
        "SELECT manifest->>'taxonomy' FROM models WHERE manifest ? 'taxonomy'"
        " AND (model_version = %s OR status = 'active') ORDER BY (model_version = %s) DESC LIMIT 1",
        (model_version, model_version)).fetchone()
    if row is None or not row[0]:
        return None
    try:
        return _parse_taxonomy(row[0])
    except ValidationError:
        log.warning("model %s has a manifest taxonomy that does not validate", model_version)
        return None


def shadow_version(conn: psycopg.Connection) -> str | None:
    """The candidate workers also run, apart, on a share of live listings (at most one)."""
    r = conn.execute("SELECT model_version FROM models WHERE status = 'shadow'").fetchone()
    return r[0] if r else None


def set_shadow(conn: psycopg.Connection, model_version: str | None, *, actor: str, reason: str = "") -> None:
    """Make a candidate the shadow (None: no shadow). Any earlier shadow goes back to being a candidate."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        for (old,) in conn.execute("SELECT model_version FROM models WHERE status = 'shadow'").fetchall():
            conn.execute("UPDATE models SET status = 'candidate' WHERE model_version = %s", (old,))
            record(conn, old, "unshadow", actor, reason)
        if model_version is None:
            return
        row = get_model(conn, model_version)
        if row is None:
            raise LookupError(f"model {model_version!r} is not registered")
        if row.status not in ("candidate", "rejected"):
            raise PermissionError(f"{model_version} is {row.status}: only a candidate runs in shadow")
        conn.execute("UPDATE models SET status = 'shadow' WHERE model_version = %s", (model_version,))
        record(conn, model_version, "shadow", actor, reason)


def list_models(conn: psycopg.Connection) -> list[ModelRow]:
    """Every registered version, newest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM models ORDER BY created_at DESC, model_version")
        return [_row(r) for r in cur.fetchall()]


def history(conn: psycopg.Connection, limit: int = 50) -> list[Move]:
    """The latest moves of the alias, newest first."""
    with conn.cursor(row_factory=class_row(Move)) as cur:
        cur.execute("SELECT model_version, action, previous, actor, reason, details, at FROM model_events"
                    " ORDER BY id DESC LIMIT %s", (limit,))
        return cur.fetchall()


def local_dir(row: ModelRow, store: ArtifactStore | None = None) -> Path:
    """A directory holding the row's files: fetched from the artifact store and verified when it has one."""
    if row.artifact_uri and store is not None:
        if not row.sha256:
            raise ModelMismatchError(f"model {row.model_version} has an artifact ({row.artifact_uri}) but no sha256 to "
                             "check it against")
        return store.fetch(row.artifact_uri, row.sha256)
    return Path(row.path)


def model_dir_for(conn: psycopg.Connection | None, override: Path | str | None = None, *,
                  version: str | None = None, newest_under: Path | None = None,
                  store: ArtifactStore | None = None) -> Path:
    """Where a model's files are, the one answer for every command and worker.

    `override` (ENRICH_MODEL_DIR, --model-dir) wins unless a `version` is asked for; then the registry's
    row for `version` (default: the active model), fetched from `store` and verified when it has an
    artifact; then `override` again; then, if given, the newest model directory under `newest_under`.
    Raises FileNotFoundError when none is known.
    """
    if override is not None and version is None:
        return Path(override)
    if conn is not None:
        row = get_model(conn, version) if version else active_model(conn)
        if row is not None and row.artifact_uri and store is not None:
            return local_dir(row, store)
        if row is not None and Path(row.path).is_dir():
            return Path(row.path)
    if override is not None:
        return Path(override)
    if newest_under is not None:
        found = sorted(Path(newest_under).glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1].parent
    where = f"model {version!r}" if version else "an active model"
    raise FileNotFoundError(f"no model found: {where} is not registered here; set ENRICH_MODEL_DIR, pass "
                            f"--model-dir, or run `enrich train --register` and `enrich promote`"
                            + (f" (also looked in {newest_under})" if newest_under else ""))


@contextmanager
def locked(conn: psycopg.Connection, model_version: str) -> Iterator[tuple[ModelRow, ModelRow | None]]:
    """A transaction holding the promotion lock, with the version's row and the active row locked: a
    decision taken inside sees the rows as they stay until the move is made. LookupError when the
    version is not registered."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        yield _lock_rows(conn, model_version)


def activate(conn: psycopg.Connection, target: ModelRow, current: ModelRow | None, *, actor: str, reason: str,
             details: dict[str, Any] | None = None) -> Decision:
    """Inside ``locked``: make ``target`` the active model (``current`` retires) and record the promotion."""
    _activate(conn, target, current)
    previous = current.model_version if current else None
    record(conn, target.model_version, "promote", actor, reason, previous, details)
    log.info("promoted %s (previous: %s) by %s", target.model_version, previous, actor)
    return Decision(True, target.model_version, previous, status="active", details=details or {})


def reject(conn: psycopg.Connection, model_version: str, *, actor: str, reason: str, previous: str | None = None,
           details: dict[str, Any] | None = None) -> None:
    """Mark a candidate rejected and record why (inside ``locked`` when a decision led to it)."""
    conn.execute("UPDATE models SET status = 'rejected' WHERE model_version = %s", (model_version,))
    record(conn, model_version, "reject", actor, reason, previous, details)
    log.info("rejected %s by %s: %s", model_version, actor, reason)


def reject_by_hand(conn: psycopg.Connection, model_version: str, *, actor: str, reason: str) -> None:
    """An admin rejects a candidate (or the shadow) without the gate, recorded with who and why."""
    if not reason.strip():
        raise ValueError("rejecting needs a reason")
    with locked(conn, model_version) as (row, act):
        if row.status not in ("candidate", "shadow"):
            raise PermissionError(f"{model_version} is {row.status}: only a candidate can be rejected")
        reject(conn, model_version, actor=actor, reason=reason, previous=act.model_version if act else None)


def promote(conn: psycopg.Connection, model_version: str, *, actor: str = "cli", reason: str = "",
            details: dict[str, Any] | None = None) -> Decision:
    """Make a registered version active WITHOUT the gate: for setting up a first model (tests, demos,
    benchmarks). Admins and jobs promote through training.gate.promote, which decides first."""
    with locked(conn, model_version) as (cand, act):
        if cand.status == "active":
            return Decision(True, model_version, model_version, ["already active"], status="active")
        return activate(conn, cand, act, actor=actor, reason=reason, details=details)


def unreject(conn: psycopg.Connection, model_version: str, *, actor: str, reason: str) -> ModelRow:
    """Put a rejected candidate back to 'candidate' (an admin's call: re-measured, or the gate was wrong),
    recorded with who and why. PermissionError for a version that is not rejected."""
    if not reason.strip():
        raise ValueError("un-rejecting needs a reason")
    with locked(conn, model_version) as (row, act):
        if row.status != "rejected":
            raise PermissionError(f"{model_version} is {row.status}, not rejected")
        conn.execute("UPDATE models SET status = 'candidate' WHERE model_version = %s", (model_version,))
        record(conn, model_version, "unreject", actor, reason, act.model_version if act else None)
    log.info("un-rejected %s by %s: %s", model_version, actor, reason)
    return replace(row, status="candidate")


def verdicts(conn: psycopg.Connection, model_version: str | None = None, *, last: bool = False) -> list[Verdict]:
    """The gate's verdicts as recorded (events whose details hold one), newest first: model_version, action,
    previous, actor, reason, at and ``gate`` (the verdict). ``last``: only each version's latest."""
    where = "details ? 'gate'" + (" AND model_version = %s" if model_version else "")
    order = "model_version, id DESC" if last else "id DESC"
    distinct = "DISTINCT ON (model_version) " if last else ""
    with conn.cursor(row_factory=class_row(Verdict)) as cur:
        cur.execute(f"SELECT {distinct}id, model_version, action, previous, actor, reason, details->'gate' AS gate,"
                    f" at FROM model_events WHERE {where} ORDER BY {order}",
                    (model_version,) if model_version else ())
        rows = cur.fetchall()
    return sorted(rows, key=lambda r: r.id, reverse=True)


def rollback(conn: psycopg.Connection, model_version: str | None = None, *, actor: str = "cli",
             reason: str = "") -> Decision:
    """Make a version that was active before active again, without the gate.

    Default: the version the current one replaced. Refused for a version that was never active.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        if model_version is None:
            r = conn.execute("SELECT previous FROM model_events WHERE action IN ('promote', 'rollback')"
                             " AND model_version = (SELECT model_version FROM models WHERE status = 'active')"
                             " ORDER BY id DESC LIMIT 1").fetchone()
            if r is None or r[0] is None:
                raise LookupError("nothing to roll back to: the active model replaced none")
            model_version = r[0]
        target, act = _lock_rows(conn, model_version)
        if target.status == "active":
            return Decision(True, model_version, model_version, ["already active"])
        if not target.was_active:
            raise PermissionError(f"{model_version} was never active: promote it through the gate instead")
        _activate(conn, target, act)
        record(conn, model_version, "rollback", actor, reason, act.model_version if act else None)
    log.info("rolled back to %s (from %s) by %s: %s", model_version, act.model_version if act else None, actor,
             reason)
    return Decision(True, model_version, act.model_version if act else None)


class BackfillNotSent(RuntimeError):
    """The alias moved, but the catalogue backfill of the new active version could not be enqueued."""


def backfill_after(decision: Decision, settings: Settings | None = None,
                   send: Callable[[str], None] | None = None) -> bool:
    """After a promotion or rollback, enqueue the catalogue backfill of the version now active, as `enrich
    promote`, `enrich rollback` and the console do. True when sent; False when the alias did not move (a
    refused promotion, or the version was active already). With `settings` the Celery app is configured for
    them first; `send` replaces core.celery_app.send_backfill (tests). Raises BackfillNotSent, saying the model
    is active and how to send the backfill again, when the broker refuses."""
    if not decision.promoted or decision.previous == decision.candidate:
        return False
    if settings is not None:
        celery_app.configure(settings)
    try:
        (send or celery_app.send_backfill)(decision.candidate)
    except Exception as exc:  # the broker is down or refuses: the alias has moved all the same
        log.exception("backfill of %s not enqueued", decision.candidate)
        raise BackfillNotSent(f"{decision.candidate} is active, but its catalogue backfill was NOT enqueued "
                              f"({exc}); send it again: enrich backfill {decision.candidate}") from exc
    log.info("backfill of %s enqueued", decision.candidate)
    return True


def _lock_rows(conn: psycopg.Connection, model_version: str) -> tuple[ModelRow, ModelRow | None]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM models WHERE model_version = %s FOR UPDATE", (model_version,))
        r = cur.fetchone()
        if r is None:
            raise LookupError(f"model {model_version!r} is not registered")
        cur.execute(f"SELECT {_COLUMNS} FROM models WHERE status = 'active' FOR UPDATE")
        a = cur.fetchone()
    return _row(r), (_row(a) if a else None)


def _activate(conn: psycopg.Connection, target: ModelRow, current: ModelRow | None) -> None:
    if current is not None:
        conn.execute("UPDATE models SET status = 'retired' WHERE model_version = %s", (current.model_version,))
    conn.execute("UPDATE models SET status = 'active', was_active = true, promoted_at = now()"
                 " WHERE model_version = %s", (target.model_version,))
