"""Model registry in Postgres (table `models`): candidates, the evaluation gate, atomic promotion.

A candidate is promoted only if it is not worse than the active model on the gate metrics, which are
measured on the same fixed evaluation set (the manifest records them). Promotion retires the previous
active row and activates the candidate in one transaction; the partial unique index
`models_one_active` guarantees at most one active row even under concurrent promotions.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from model.checkpoint import read_manifest

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


@dataclass
class Decision:
    promoted: bool
    candidate: str
    previous: str | None
    reasons: list[str] = field(default_factory=list)  # why not (or what was compared)


def _row(r: dict) -> ModelRow:
    return ModelRow(r["model_version"], r["path"], r["status"], dict(r["metrics"] or {}), r["created_at"],
                    r["promoted_at"])


def register_candidate(conn: psycopg.Connection, model_dir: Path | str) -> ModelRow:
    """Insert the model directory's manifest as a candidate (idempotent on model_version)."""
    model_dir = Path(model_dir).resolve()
    manifest = read_manifest(model_dir)
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "INSERT INTO models (model_version, manifest, metrics, path, status)"
            " VALUES (%s, %s::jsonb, %s::jsonb, %s, 'candidate')"
            " ON CONFLICT (model_version) DO UPDATE SET path = EXCLUDED.path"
            " RETURNING model_version, path, status, metrics, created_at, promoted_at",
            (manifest.model_version, manifest.model_dump_json(), json.dumps(manifest.metrics), str(model_dir)),
        )
        row = _row(cur.fetchone())
    log.info("registered %s (%s) from %s", row.model_version, row.status, model_dir)
    return row


def get_model(conn: psycopg.Connection, model_version: str) -> ModelRow | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT model_version, path, status, metrics, created_at, promoted_at FROM models"
                    " WHERE model_version = %s", (model_version,))
        r = cur.fetchone()
    return _row(r) if r else None


def active_model(conn: psycopg.Connection) -> ModelRow | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT model_version, path, status, metrics, created_at, promoted_at FROM models"
                    " WHERE status = 'active'")
        r = cur.fetchone()
    return _row(r) if r else None


def model_dir_for(conn: psycopg.Connection | None, override: Path | str | None = None, *,
                  version: str | None = None, newest_under: Path | None = None) -> Path:
    """Where a model's files are, the one answer for every command and worker.

    `override` (ENRICH_MODEL_DIR, --model-dir) wins unless a `version` is asked for; then the registry's
    row for `version` (default: the active model); then `override` again; then, if given, the newest
    model directory under `newest_under`. Raises FileNotFoundError when none is known.
    """
    if override is not None and version is None:
        return Path(override)
    if conn is not None:
        row = get_model(conn, version) if version else active_model(conn)
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
            tolerance: float = 0.0, metrics: dict[str, dict[str, float]] | None = None) -> Decision:
    """Promote the candidate if it is not worse than the active model; reject it otherwise.

    ``metrics``: optional fresh measurements {model_version: metrics} on the fixed evaluation set; by
    default the metrics stored at registration are compared. Runs in one transaction.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT model_version, path, status, metrics, created_at, promoted_at FROM models"
                        " WHERE model_version = %s FOR UPDATE", (model_version,))
            r = cur.fetchone()
            if r is None:
                raise LookupError(f"model {model_version!r} is not registered")
            cand = _row(r)
            cur.execute("SELECT model_version, path, status, metrics, created_at, promoted_at FROM models"
                        " WHERE status = 'active' FOR UPDATE")
            a = cur.fetchone()
            act = _row(a) if a else None
        if cand.status == "active":
            return Decision(True, model_version, model_version, ["already active"])
        if act is not None:
            cm = (metrics or {}).get(cand.model_version, cand.metrics)
            am = (metrics or {}).get(act.model_version, act.metrics)
            ok, reasons = compare(cm, am, gate, tolerance)
            if not ok:
                conn.execute("UPDATE models SET status = 'rejected' WHERE model_version = %s", (model_version,))
                log.info("rejected %s against %s: %s", model_version, act.model_version, "; ".join(reasons))
                return Decision(False, model_version, act.model_version, reasons)
            conn.execute("UPDATE models SET status = 'retired' WHERE model_version = %s", (act.model_version,))
        conn.execute("UPDATE models SET status = 'active', promoted_at = now() WHERE model_version = %s",
                     (model_version,))
    log.info("promoted %s (previous: %s)", model_version, act.model_version if act else None)
    return Decision(True, model_version, act.model_version if act else None)
