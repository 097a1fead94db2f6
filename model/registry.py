"""Model registry in Postgres (table `models`): immutable versions, an "active" alias that moves.

A candidate is promoted only if it is not worse than the active model on the gate metrics, which are
measured on the same fixed evaluation set (the manifest records them). Promotion retires the previous
active row and activates the candidate in one transaction; the partial unique index
`models_one_active` guarantees at most one active row even under concurrent promotions. A version
that was active before can be made active again without the gate (`rollback`). Every move is kept in
`model_events` with who and why.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Callable

import psycopg
from psycopg.rows import dict_row
from pydantic import ValidationError

from model.checkpoint import read_manifest
from model.shadow import shadow_gate, shadow_report
from schemas.taxonomy import Taxonomy

log = logging.getLogger(__name__)

# metric -> True if higher is better. Only metrics both models have are compared.
DEFAULT_GATE: dict[str, bool] = {
    "test/top1": True, "test/macro_f1": True, "test/attr/exact_match": True, "test/attr/micro_f1": True,
    "test/attr/hamming": False, "test/recall@1": True, "test/map@r": True,
}
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


_COLUMNS = ("model_version, path, status, metrics, created_at, promoted_at, artifact_uri, sha256, was_active,"
            " registered_by, reason, manifest->>'data_fingerprint' AS data_fingerprint")


@dataclass
class Decision:
    promoted: bool
    candidate: str
    previous: str | None
    reasons: list[str] = field(default_factory=list)  # why not (or what was compared)


def _row(r: dict) -> ModelRow:
    return ModelRow(r["model_version"], r["path"], r["status"], dict(r["metrics"] or {}), r["created_at"],
                    r["promoted_at"], r["artifact_uri"], r["sha256"], r["was_active"], r["registered_by"],
                    r["reason"], r["data_fingerprint"])


def _event(conn: psycopg.Connection, model_version: str, action: str, actor: str, reason: str,
           previous: str | None = None, details: dict | None = None) -> None:
    conn.execute("INSERT INTO model_events (model_version, action, previous, actor, reason, details)"
                 " VALUES (%s, %s, %s, %s, %s, %s::jsonb)",
                 (model_version, action, previous, actor, reason, json.dumps(details or {})))


def register_candidate(conn: psycopg.Connection, model_dir: Path | str, store=None, *, actor: str = "cli",
                       reason: str = "") -> ModelRow:
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
        row = _row(cur.fetchone())
        _event(conn, row.model_version, "register", actor, reason, details={"artifact_uri": uri})
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
            _event(conn, old, "unshadow", actor, reason)
        if model_version is None:
            return
        row = get_model(conn, model_version)
        if row is None:
            raise LookupError(f"model {model_version!r} is not registered")
        if row.status not in ("candidate", "rejected"):
            raise PermissionError(f"{model_version} is {row.status}: only a candidate runs in shadow")
        conn.execute("UPDATE models SET status = 'shadow' WHERE model_version = %s", (model_version,))
        _event(conn, model_version, "shadow", actor, reason)


def list_models(conn: psycopg.Connection) -> list[ModelRow]:
    """Every registered version, newest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM models ORDER BY created_at DESC, model_version")
        return [_row(r) for r in cur.fetchall()]


def history(conn: psycopg.Connection, limit: int = 50) -> list[dict]:
    """The latest moves of the alias: version, action, previous, actor, reason, at."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT model_version, action, previous, actor, reason, details, at FROM model_events"
                    " ORDER BY id DESC LIMIT %s", (limit,))
        return cur.fetchall()


def local_dir(row: ModelRow, store=None) -> Path:
    """A directory holding the row's files: fetched from the artifact store and verified when it has one."""
    if row.artifact_uri and store is not None:
        return store.fetch(row.artifact_uri, row.sha256)
    return Path(row.path)


def model_dir_for(conn: psycopg.Connection | None, override: Path | str | None = None, *,
                  version: str | None = None, newest_under: Path | None = None, store=None) -> Path:
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


def compare(candidate: dict[str, float], active: dict[str, float], gate: dict[str, bool] | None = None,
            tolerance: float = 0.0) -> tuple[bool, list[str]]:
    """Not worse on every gate metric both have (within tolerance). Returns (ok, reasons)."""
    gate = DEFAULT_GATE if gate is None else gate
    eval_keys = sorted(k for k in set(candidate) | set(active) if k.startswith("eval/"))
    differ = [k for k in eval_keys if candidate.get(k) != active.get(k)]
    if differ:
        return False, [f"measured on different evaluation sets ({', '.join(differ)}); re-measure both "
                       "on the fixed set (enrich promote --reevaluate)"]
    reasons, compared = [], 0
    for key, higher in gate.items():
        if key not in candidate or key not in active:
            continue
        compared += 1
        c, a = float(candidate[key]), float(active[key])
        worse = c < a - tolerance if higher else c > a + tolerance
        if worse:
            reasons.append(f"{key}: candidate {c:.4f} is worse than active {a:.4f}")
    if compared == 0:
        return False, ["no gate metric in common with the active model"]
    return not reasons, reasons


def promote(conn: psycopg.Connection, model_version: str, gate: dict[str, bool] | None = None,
            tolerance: float = 0.0, metrics: dict[str, dict[str, float]] | None = None, *, actor: str = "cli",
            reason: str = "", shadow_min_corrections: int | None = None) -> Decision:
    """Promote the candidate if it is not worse than the active model; reject it otherwise.

    ``metrics``: optional fresh measurements {model_version: metrics} on the fixed evaluation set; by
    default the metrics stored at registration are compared. ``shadow_min_corrections``: also require the
    shadow figures (model/shadow.py) — that many fresh corrections, and the candidate right at least as
    often as the active model. Runs in one transaction.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        cand, act = _lock_rows(conn, model_version)
        if cand.status == "active":
            return Decision(True, model_version, model_version, ["already active"])
        if act is not None:
            if metrics is None:  # stored figures: comparable only when measured on the same fixed set
                apart = _different_eval_sets(conn, cand.model_version, act.model_version)
                if apart:
                    log.info("refused %s against %s: %s", model_version, act.model_version, apart)
                    return Decision(False, model_version, act.model_version, [apart])
            cm = (metrics or {}).get(cand.model_version, cand.metrics)
            am = (metrics or {}).get(act.model_version, act.metrics)
            ok, reasons = compare(cm, am, gate, tolerance)
            if ok and shadow_min_corrections is not None:
                ok, reasons = shadow_gate(shadow_report(conn, model_version), shadow_min_corrections)
            if not ok:
                conn.execute("UPDATE models SET status = 'rejected' WHERE model_version = %s", (model_version,))
                _event(conn, model_version, "reject", actor, reason, act.model_version, {"reasons": reasons})
                log.info("rejected %s against %s: %s", model_version, act.model_version, "; ".join(reasons))
                return Decision(False, model_version, act.model_version, reasons)
        _activate(conn, cand, act)
        _event(conn, model_version, "promote", actor, reason, act.model_version if act else None)
    log.info("promoted %s (previous: %s) by %s", model_version, act.model_version if act else None, actor)
    return Decision(True, model_version, act.model_version if act else None)


def _different_eval_sets(conn: psycopg.Connection, a: str, b: str) -> str | None:
    """Why two models' stored metrics cannot be compared, or None. Models that record no set (older
    manifests) fall back to compare()'s eval/* check."""
    sets = dict(conn.execute("SELECT model_version, manifest->>'eval_set' FROM models WHERE model_version = ANY(%s)",
                             ([a, b],)).fetchall())
    if sets.get(a) and sets.get(b) and sets[a] != sets[b]:
        return (f"measured on different evaluation sets ({sets[a]} vs {sets[b]}); re-measure both on one with "
                "`enrich promote --reevaluate`")
    return None


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
        _event(conn, model_version, "rollback", actor, reason, act.model_version if act else None)
    log.info("rolled back to %s (from %s) by %s: %s", model_version, act.model_version if act else None, actor,
             reason)
    return Decision(True, model_version, act.model_version if act else None)


class BackfillNotSent(RuntimeError):
    """The alias moved, but the catalogue backfill of the new active version could not be enqueued."""


def backfill_after(decision: Decision, settings=None, send: Callable[[str], None] | None = None) -> bool:
    """After a promotion or rollback, enqueue the catalogue backfill of the version now active, as `enrich
    promote`, `enrich rollback` and the console do. True when sent; False when the alias did not move (a
    refused promotion, or the version was active already). With `settings` (core.config.Settings) the Celery
    app is configured for them first; `send` replaces core.celery_app.send_backfill (tests). Raises
    BackfillNotSent, saying the model is active and how to send the backfill again, when the broker refuses."""
    if not decision.promoted or decision.previous == decision.candidate:
        return False
    from core import celery_app

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
