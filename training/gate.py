"""The promotion gate: the one place that measures, compares and decides whether a candidate may replace the
active model. `enrich promote`, the console's promote button and a retraining job all call ``promote``; the
registry (model.registry) only makes the move decided here, under its promotion lock.

What is compared, on figures measured on one fixed evaluation set (the stored ones, or both models measured
again with ``measure``):
- overall: each gate metric both models have (GATE_METRICS); the candidate may be worse by the tolerance at
  most (ENRICH_GATE_TOLERANCE; `enrich promote --tolerance` overrides it);
- per class: no category's recall (its accuracy, ``test/class_recall/<name>``) lower by more than the class
  margin (ENRICH_GATE_CLASS_MARGIN), even when the candidate is better overall;
- held-out corrections: the labels people corrected after the active model's training began on the listings
  kept out of retraining (ENRICH_CORRECTIONS_HOLDOUT, training.corrections.is_held_out), where there are at
  least MIN_HELD_OUT: the candidate right no less often than the active model, within the same margin (on
  all groups pooled; each group's figures are shown with the verdict, not gated);
- when asked, the shadow figures (model/shadow.py).
A tolerance above the class margin widens the per-class and held-out margins to it.

Outcomes: ``pass`` (promoted; a retraining job without ENRICH_AUTO_PROMOTE leaves it waiting for an admin),
``fail`` (the candidate is rejected; an admin can un-reject it) and ``refused`` (not comparable: different
evaluation sets, or the active model could not be measured; it stays a candidate). Every verdict is stored
with its model event, ``model_events.details["gate"]``: the figures compared, tolerance and margin,
evaluation sets, per-group and per-class deltas, held-out figures, reasons and notes. A promotion against a
failing verdict (``force``, or a tolerance above the setting) records who, why and the reasons it overrode.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import psycopg
from PIL import Image

from core.config import Settings
from core.images import load_image
from model import registry
from model.artifacts import ArtifactStore, store_from_settings
from model.checkpoint import load_model
from model.inference import resolve_device
from model.manifest import read_manifest
from model.registry import Decision, ModelRow
from model.shadow import shadow_gate, shadow_report
from schemas.taxonomy import CATEGORY_GROUP, Taxonomy
from training.corrections import CorrectionLabel, correction_labels, corrections_to_images
from training.eval_sets import EvalSetError
from training.evaluate import predict_dataset, reevaluate_for_gate
from training.scores import CLASS_RECALL as _CLASS_KEY

log = logging.getLogger(__name__)

# metric -> True if higher is better. Only metrics both models have are compared.
GATE_METRICS: dict[str, bool] = {
    "test/top1": True, "test/macro_f1": True, "test/attr/exact_match": True, "test/attr/micro_f1": True,
    "test/attr/hamming": False, "test/recall@1": True, "test/map@r": True,
}
CLASS_RECALL = f"test/{_CLASS_KEY}"  # + category name: its recall on the test split
MIN_HELD_OUT = 20  # held-out corrected labels needed before they count
PASS, FAIL, REFUSED = "pass", "fail", "refused"


@dataclass
class Verdict:
    """What the gate found. ``as_dict()`` is what model_events.details["gate"] holds."""
    outcome: str  # pass, fail or refused
    candidate: str
    active: str | None
    reasons: list[str] = field(default_factory=list)  # why it fails or is refused
    notes: list[str] = field(default_factory=list)  # what could not be checked, and why
    tolerance: float = 0.0
    class_margin: float = 0.0
    measured: str = "stored"  # the figures registered with the models, or "re-measured" now
    eval_sets: dict[str, str | None] = field(default_factory=dict)  # candidate / active -> evaluation set id
    metrics: dict[str, dict] = field(default_factory=dict)  # gate metric -> candidate, active, delta, ok
    groups: dict[str, dict] = field(default_factory=dict)  # group -> {accuracy|map: candidate, active, delta}
    classes: dict[str, dict] = field(default_factory=dict)  # category -> candidate, active, delta, ok
    held_out: dict = field(default_factory=dict)  # since, share, labels, candidate, active, delta, groups (or a note)
    shadow: dict | None = None
    forced: dict | None = None  # by, why, overridden (the failing reasons), tolerance asked, setting

    @property
    def passed(self) -> bool:
        return self.outcome == PASS

    def as_dict(self) -> dict:
        return asdict(self)


# ---- deciding ------------------------------------------------------------------------------------------

def decide(candidate: dict[str, float], active: dict[str, float] | None, *, tolerance: float = 0.0,
           class_margin: float = 0.05, eval_sets: tuple[str | None, str | None] = (None, None),
           held_out: dict | None = None, names: tuple[str, str | None] = ("candidate", None),
           measured: str = "stored") -> Verdict:
    """The verdict on a candidate's metrics against the active model's (no database, no files).

    ``active`` None: there is no active model and it passes. ``eval_sets``: the evaluation set ids the two
    were measured on (refused when both are known and differ, or when their ``eval/*`` figures differ).
    ``held_out``: figures on the held-out corrections, as ``held_out_figures`` gives them."""
    v = Verdict(PASS, names[0], names[1], tolerance=tolerance, class_margin=class_margin, measured=measured,
                eval_sets={"candidate": eval_sets[0], "active": eval_sets[1]})
    if active is None:
        v.notes.append("no active model: nothing to compare with")
        return v
    apart = _not_comparable(candidate, active, *eval_sets)
    if apart:
        v.outcome, v.reasons = REFUSED, [apart]
        return v
    margin = max(class_margin, tolerance)
    _overall(v, candidate, active, tolerance)
    _groups(v, candidate, active)
    _classes(v, candidate, active, margin)
    _held_out(v, held_out, margin)
    if v.reasons:
        v.outcome = FAIL
    return v


def _not_comparable(candidate: dict, active: dict, cand_set: str | None, act_set: str | None) -> str | None:
    if cand_set and act_set and cand_set != act_set:
        return (f"measured on different evaluation sets ({cand_set} vs {act_set}); re-measure both on one with "
                "`enrich promote --reevaluate`")
    # models that record no set id (older manifests): the eval/* figures training stores
    differ = [k for k in sorted(set(candidate) | set(active)) if k.startswith("eval/")
              and candidate.get(k) != active.get(k)]
    if differ:
        return (f"measured on different evaluation sets ({', '.join(differ)}); re-measure both on the fixed set "
                "(enrich promote --reevaluate)")
    return None


def _overall(v: Verdict, candidate: dict, active: dict, tolerance: float) -> None:
    for key, higher in GATE_METRICS.items():
        if key not in candidate or key not in active:
            continue
        c, a = float(candidate[key]), float(active[key])
        worse = c < a - tolerance if higher else c > a + tolerance
        v.metrics[key] = {"candidate": c, "active": a, "delta": c - a, "higher_is_better": higher, "ok": not worse}
        if worse:
            v.reasons.append(f"{key}: candidate {c:.4f} is worse than active {a:.4f}"
                             + (f" by more than the tolerance {tolerance:g}" if tolerance else ""))
    if not v.metrics:
        v.reasons.append("no gate metric in common with the active model")


def _groups(v: Verdict, candidate: dict, active: dict) -> None:
    """Per attribute group (and the category's mAP): the deltas, shown with the verdict, not gated."""
    for key in sorted(set(candidate) & set(active)):
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "test" and parts[1] == "map":
            group, kind = parts[2], "map"
        elif len(parts) == 3 and parts[0] == "test" and parts[2] == "accuracy":
            group, kind = parts[1], "accuracy"
        else:
            continue
        c, a = float(candidate[key]), float(active[key])
        v.groups.setdefault(group, {})[kind] = {"candidate": c, "active": a, "delta": c - a}


def _classes(v: Verdict, candidate: dict, active: dict, margin: float) -> None:
    names = sorted(k[len(CLASS_RECALL):] for k in set(candidate) & set(active) if k.startswith(CLASS_RECALL))
    if not names:
        v.notes.append("per-class check not run: the two models have no per-category figures in common "
                       "(re-measure both with `enrich promote --reevaluate`)")
        return
    for name in names:
        c, a = float(candidate[CLASS_RECALL + name]), float(active[CLASS_RECALL + name])
        ok = c >= a - margin
        v.classes[name] = {"candidate": c, "active": a, "delta": c - a, "ok": ok}
        if not ok:
            v.reasons.append(f"category {name}: recall {c:.4f} against the active model's {a:.4f} ({c - a:+.4f}, "
                             f"more than the class margin {margin:g})")


def _held_out(v: Verdict, figures: dict | None, margin: float) -> None:
    if figures is None:
        v.notes.append("held-out corrections not measured")
        return
    v.held_out = dict(figures)
    if figures.get("note"):
        v.notes.append(figures["note"])
        return
    c, a, n = figures["candidate"], figures["active"], figures["labels"]
    if c < a - margin:
        v.reasons.append(f"held-out corrections: the candidate is right on {c:.1%} of {n} corrected labels, the "
                         f"active model on {a:.1%} (more than the class margin {margin:g} worse)")
    if figures.get("share") == 0:
        v.notes.append("held-out corrections are not held out (ENRICH_CORRECTIONS_HOLDOUT is 0): the candidate may "
                       "have trained on them")
    v.notes += held_out_group_lines(figures)


def held_out_group_lines(figures: dict) -> list[str]:
    """One line per group of the held-out figures: "held-out corrections colour: 83.0% vs 79.0% (+4.0) on 100
    labels" (candidate vs active, the difference in points)."""
    return [f"held-out corrections {g}: {f['candidate']:.1%} vs {f['active']:.1%} ({f['delta'] * 100:+.1f}) on "
            f"{f['labels']} labels" for g, f in (figures.get("groups") or {}).items()]


# ---- measuring -----------------------------------------------------------------------------------------

@dataclass
class Measured:
    """Figures measured now, both models on one fixed evaluation set (or why the active one was not)."""
    metrics: dict[str, dict[str, float]]  # model_version -> metrics
    eval_set: str
    refusal: str | None = None


def measure(candidate_dir: Path | str, active_dir: Path | str | None = None, *, device: str = "auto",
            settings: Settings | None = None) -> Measured:
    """Measure the candidate and the active model on the candidate's dataset's fixed evaluation set
    (training.evaluate.reevaluate_for_gate). When the active model cannot be measured there (another dataset
    or taxonomy, unreadable files), the candidate alone is, and ``refusal`` says why. ``settings``: where the
    dataset needs them (a catalogue's database and image loader)."""
    try:
        cand, act = reevaluate_for_gate(candidate_dir, active_dir, device=device, settings=settings)
    except Exception as exc:
        if active_dir is None:
            raise
        cand, _ = reevaluate_for_gate(candidate_dir, None, device=device, settings=settings)  # its own errors raise
        why = str(exc) if isinstance(exc, EvalSetError) else \
            f"the active model cannot be measured on this evaluation set: {exc}"
        log.warning("gate: %s", why)
        return Measured({cand.model_version: cand.metrics}, cand.eval_set, refusal=why)
    metrics = {cand.model_version: cand.metrics}
    if act is not None:
        metrics[act.model_version] = act.metrics
    return Measured(metrics, cand.eval_set)


def training_start(conn: psycopg.Connection, model: ModelRow) -> datetime | None:
    """When a model's training began: its lineage says, else its job's start, else when it was saved."""
    row = conn.execute(
        "SELECT coalesce((manifest->'lineage'->>'started_at')::timestamptz,"
        " (SELECT started_at FROM training_jobs WHERE model_version = m.model_version AND started_at IS NOT NULL"
        "  ORDER BY id DESC LIMIT 1), (manifest->>'created_at')::timestamptz)"
        " FROM models m WHERE model_version = %s", (model.model_version,)).fetchone()
    return row[0] if row is not None else None


def held_out_figures(conn: psycopg.Connection, candidate_dir: Path | str, active_dir: Path | str,
                     since: datetime | None, settings: Settings) -> dict:
    """Both models on the held-out corrections (the listings retraining leaves out,
    ENRICH_CORRECTIONS_HOLDOUT) people corrected after ``since`` (the active model's training start): the
    share of labels each gets right, pooled ({since, share, labels, candidate, active, delta}) and per group
    (``groups``: {group: {labels, candidate, active, delta}}), their photos fetched as the worker fetches them.
    Share 0: every correction since then (the candidate may have trained on them). Fewer than MIN_HELD_OUT
    labels: {since, share, labels, note}, and no model is loaded."""
    share = settings.corrections_holdout
    out: dict = {"since": since.isoformat() if since else None, "share": share, "labels": 0}
    taxonomy = read_manifest(candidate_dir).taxonomy
    if read_manifest(active_dir).taxonomy_sha256 != taxonomy.sha256():
        out["note"] = "held-out corrections not compared: the two models have different taxonomies"
        return out
    held = set(conn.execute("SELECT DISTINCT listing_id, tag_group FROM corrections"
                            " WHERE %(since)s::timestamptz IS NULL OR received_at > %(since)s",
                            {"since": since}).fetchall())
    labels = [lab for lab in correction_labels(conn, taxonomy, holdout="eval" if share else None, share=share)
              if (lab.listing_id, lab.group) in held]
    n = len(labels)
    if n >= MIN_HELD_OUT:
        load = partial(load_image, settings=settings)
        cand = _right_on(labels, candidate_dir, taxonomy, load, settings.device)
        act = _right_on(labels, active_dir, taxonomy, load, settings.device)
        n, n_a = sum(t for _, t in cand.values()), sum(t for _, t in act.values())
        if n >= MIN_HELD_OUT and n_a:
            c, a = sum(r for r, _ in cand.values()) / n, sum(r for r, _ in act.values()) / n_a
            out.update(labels=n, candidate=c, active=a, delta=c - a, groups={})
            for group, (right, total) in cand.items():
                if total and act.get(group, (0, 0))[1]:
                    gc, ga = right / total, act[group][0] / act[group][1]
                    out["groups"][group] = {"labels": total, "candidate": gc, "active": ga, "delta": gc - ga}
            return out
    out["labels"] = n
    out["note"] = (f"not enough held-out corrections: {n} corrected label(s) (with a photo) since the active "
                   f"model's training began, {MIN_HELD_OUT} needed")
    return out


def _right_on(labels: list[CorrectionLabel], model_dir: Path | str, taxonomy: Taxonomy,
              load: Callable[[str], Image.Image], device: str) -> dict[str, tuple[int, int]]:
    """Per group (the category and each exclusive attribute group): (labels the model gets right, labels
    measured) on the corrected listings' first loadable photo."""
    model, manifest = load_model(model_dir)
    dev = resolve_device(device)
    rows = corrections_to_images(labels, taxonomy, load, manifest.image_size)
    if not len(rows):
        return {}
    preds = predict_dataset(model.to(dev), rows, manifest.image_size, dev)
    heads = {CATEGORY_GROUP: (preds.category, rows.category)}
    heads.update({g.name: (preds.groups[g.name], rows.groups[g.name]) for g in taxonomy.attribute_groups
                  if g.exclusive})
    out = {}
    for group, (scores, target) in heads.items():
        labelled = target >= 0
        out[group] = (int((scores.argmax(axis=1) == target)[labelled].sum()), int(labelled.sum()))
    return out


# ---- promoting -----------------------------------------------------------------------------------------

def promote(conn: psycopg.Connection, model_version: str, settings: Settings, *, actor: str, reason: str = "",
            tolerance: float | None = None, force: bool = False, reevaluate: bool = False,
            measured: Measured | None = None, shadow_min_corrections: int | None = None, activate: bool = True,
            store: ArtifactStore | None = None) -> Decision:
    """Judge a registered candidate against the active model and carry the verdict out: promote it (pass),
    reject it (fail) or leave it a candidate (refused); the verdict is recorded with the event either way.

    ``tolerance``: the allowed drop on each gate metric (default ``settings.gate_tolerance``). ``reevaluate``:
    measure both models now instead of comparing the stored figures; ``measured``: figures measured already
    (a retraining job's). ``force``: promote whatever the verdict (needs a reason). ``shadow_min_corrections``:
    also require the shadow figures. ``activate`` False: record a passing verdict and leave the candidate
    waiting (a retraining job without ENRICH_AUTO_PROMOTE). ``store``: the artifact store the models' files
    are in (default: the settings'). LookupError for a version that is not registered."""
    if force and not reason.strip():
        raise ValueError("a forced promotion needs a reason")
    cand, act = registry.get_model(conn, model_version), registry.active_model(conn)
    if cand is None:
        raise LookupError(f"model {model_version!r} is not registered")
    if cand.status == "active":
        return Decision(True, model_version, model_version, ["already active"], status="active")
    dirs = _Dirs(settings, store)
    if reevaluate and measured is None and act is not None:
        measured = measure(dirs(cand), dirs(act), device=settings.device, settings=settings)
    held = _held_out_of(conn, cand, act, settings, dirs) if act is not None else None
    shadow = shadow_report(conn, model_version) if shadow_min_corrections is not None else None

    def judge(tol: float) -> Verdict:
        v = _verdict(cand, act, measured, held, tol, settings.gate_class_margin)
        if shadow is not None and shadow_min_corrections is not None and act is not None and v.outcome != REFUSED:
            ok, why = shadow_gate(shadow, shadow_min_corrections)
            v.shadow = {"required": shadow_min_corrections, "corrections": shadow.corrections,
                        "candidate": shadow.candidate_accuracy, "active": shadow.active_accuracy}
            if not ok:
                v.outcome, v.reasons = FAIL, v.reasons + why
        return v

    strict = judge(settings.gate_tolerance)
    verdict = strict if tolerance is None or tolerance == settings.gate_tolerance else judge(tolerance)
    with registry.locked(conn, model_version) as (locked_cand, now):
        if (now.model_version if now else None) != (act.model_version if act else None):
            verdict = Verdict(REFUSED, model_version, now.model_version if now else None,
                              [f"the active model changed while the gate measured ({act.model_version if act else None}"
                               f" → {now.model_version if now else None}); try again"])
            strict = verdict
        return _carry_out(conn, locked_cand, now, verdict, strict, tolerance, settings, actor, reason, force, activate)


class _Dirs:
    """A registered model's local directory (fetched from the artifact store once, when it has an artifact)."""

    def __init__(self, settings: Settings, store: ArtifactStore | None) -> None:
        self.settings, self.store = settings, store

    def __call__(self, row: ModelRow) -> Path:
        if row.artifact_uri and self.store is None:
            self.store = store_from_settings(self.settings)
        return registry.local_dir(row, self.store)


def _held_out_of(conn, cand: ModelRow, act: ModelRow, settings: Settings, dirs: _Dirs) -> dict:
    since = training_start(conn, act)
    try:
        return held_out_figures(conn, dirs(cand), dirs(act), since, settings)
    except Exception as exc:
        log.warning("gate: held-out corrections not measured: %s", exc)
        return {"since": since.isoformat() if since else None, "labels": 0,
                "note": f"held-out corrections not measured: {exc}"}


def _verdict(cand: ModelRow, act: ModelRow | None, measured: Measured | None, held: dict | None,
             tolerance: float, class_margin: float) -> Verdict:
    names = (cand.model_version, act.model_version if act else None)
    if measured is None or cand.model_version not in measured.metrics:
        return decide(cand.metrics, act.metrics if act else None, tolerance=tolerance, class_margin=class_margin,
                      eval_sets=(cand.eval_set, act.eval_set if act else None), held_out=held, names=names)
    if act is not None and act.model_version not in measured.metrics:
        return Verdict(REFUSED, *names, reasons=[measured.refusal or f"the active {act.model_version} was not "
                                                 "measured"], tolerance=tolerance, class_margin=class_margin,
                       measured="re-measured", eval_sets={"candidate": measured.eval_set, "active": None})
    return decide(measured.metrics[cand.model_version], measured.metrics[act.model_version] if act else None,
                  tolerance=tolerance, class_margin=class_margin, eval_sets=(measured.eval_set, measured.eval_set),
                  held_out=held, names=names, measured="re-measured")


def _carry_out(conn, cand: ModelRow, act: ModelRow | None, verdict: Verdict, strict: Verdict,
               tolerance: float | None, settings: Settings, actor: str, reason: str, force: bool,
               activate: bool) -> Decision:
    version, previous = cand.model_version, act.model_version if act else None
    if not strict.passed and (force or verdict.passed):  # an admin's override: who, why, what it overrode
        verdict.forced = {"by": actor, "why": reason, "force": force, "overridden": strict.reasons,
                          "outcome": strict.outcome, "tolerance": tolerance, "setting": settings.gate_tolerance}
    details = {"gate": verdict.as_dict()}
    if verdict.passed or force:
        if activate:
            decision = registry.activate(conn, cand, act, actor=actor, reason=reason, details=details)
            decision.reasons = [f"overrides: {r}" for r in strict.reasons] if verdict.forced else []
            return decision
        registry.record(conn, version, "gate", actor, reason, previous, details)
        return Decision(False, version, previous, [], status=cand.status, details=details)
    if verdict.outcome == REFUSED:
        registry.record(conn, version, "gate", actor, reason, previous, details)
        log.info("gate refused %s against %s: %s", version, previous, "; ".join(verdict.reasons))
        return Decision(False, version, previous, verdict.reasons, status=cand.status, details=details)
    registry.reject(conn, version, actor=actor, reason=reason, previous=previous, details=details)
    return Decision(False, version, previous, verdict.reasons, status="rejected", details=details)


def preview(selected: ModelRow, active: ModelRow | None, settings: Settings) -> Verdict:
    """The verdict on the stored figures, as the console shows it before anyone promotes (held-out
    corrections are measured only when promoting)."""
    return decide(selected.metrics, active.metrics if active else None, tolerance=settings.gate_tolerance,
                  class_margin=settings.gate_class_margin,
                  eval_sets=(selected.eval_set, active.eval_set if active else None),
                  held_out={"note": "held-out corrections are measured when promoting"},
                  names=(selected.model_version, active.model_version if active else None))


def summary(gate: dict | None, limit: int = 400) -> str:
    """One line for a recorded verdict: "fail: test/top1: candidate …; category Shirt: …" (at most ``limit``
    characters; ``explain`` has it all)."""
    if not gate:
        return ""
    text = gate.get("outcome", "")
    if gate.get("forced"):
        text = f"forced by {gate['forced'].get('by')} over: " + "; ".join(gate["forced"].get("overridden") or [])
    elif gate.get("reasons"):
        text += ": " + "; ".join(gate["reasons"])
    return text if len(text) <= limit else text[:limit - 1] + "…"


def explain(gate: dict) -> list[str]:
    """A recorded verdict in lines: outcome, tolerance, sets, overall and per-class deltas, held-out, why."""
    lines = [f"{gate['outcome']} against {gate.get('active') or 'no active model'} ({gate.get('measured')} figures,"
             f" tolerance {gate.get('tolerance', 0):g}, class margin {gate.get('class_margin', 0):g})"]
    sets = gate.get("eval_sets") or {}
    if sets.get("candidate") or sets.get("active"):
        lines.append(f"evaluation sets: candidate {sets.get('candidate') or '?'}, active {sets.get('active') or '?'}")
    for key, m in (gate.get("metrics") or {}).items():
        lines.append(f"{key}: {m['candidate']:.4f} vs {m['active']:.4f} ({m['delta']:+.4f})"
                     + ("" if m["ok"] else "  WORSE"))
    for group, kinds in (gate.get("groups") or {}).items():
        lines.append(f"group {group}: " + ", ".join(f"{k} {d['delta']:+.4f}" for k, d in kinds.items()))
    for name, c in (gate.get("classes") or {}).items():
        lines.append(f"category {name}: recall {c['candidate']:.4f} vs {c['active']:.4f} ({c['delta']:+.4f})"
                     + ("" if c["ok"] else "  WORSE"))
    held = gate.get("held_out") or {}
    if held.get("candidate") is not None:
        lines.append(f"held-out corrections ({held['labels']}): candidate {held['candidate']:.1%}, active "
                     f"{held['active']:.1%}")
    held_groups = held_out_group_lines(held) if held.get("candidate") is not None else []
    lines += held_groups  # beside the pooled figure; the notes repeat them
    forced = gate.get("forced")
    if forced:
        lines.append(f"FORCED by {forced['by']}: {forced['why'] or 'no reason given'}; overrode: "
                     + ("; ".join(forced["overridden"]) or "nothing"))
    lines += [f"reason: {r}" for r in gate.get("reasons") or []]
    lines += [f"note: {n}" for n in gate.get("notes") or [] if n not in held_groups]
    return lines
