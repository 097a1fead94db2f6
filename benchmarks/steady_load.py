"""Steady load: phases of constant traffic at shares of the measured capacity, no faults.

    .venv/bin/python benchmarks/steady_load.py [--shares 0.25,0.5,0.8] [--minutes 10] [--catalogue 0]
        [--capacity EV_PER_S] [--baseline] [--baseline-rev 3b18662] [--out benchmarks/results/steady_load]
        [--sample-every 5] [--window 30]

Does the system keep up at a steady share of its capacity? Two things can make it fall behind: worker
tasks whose time grows with the catalogue (the embeddings written since the last similar-items snapshot),
and tasks that carry few listings under moderate load. This measures both: task time and listings per task
over time, window by window, with the lag and the event → row latency they cause. Run it on the current
tree and with --baseline (the code of --baseline-rev) to compare two versions.

What runs (private to this script, as in benchmarks/soak.py, whose Producer, Sampler and Supervisor it uses):
  Postgres (migrated by the current tree, no audit triggers), a RabbitMQ node, Tansu (Kafka) and moto (S3)
  serving a handful of real images; the small real model of harness/models.py; a topic of 4
  partitions; ONE `enrich consume`, ONE `enrich worker` (solo pool, 1 torch thread) and a worker for the cpu
  queue (the reindex a worker may ask for). With --baseline they run from a git worktree of --baseline-rev
  (same Python, the worktree as cwd and PYTHONPATH), removed at the end; the database schema is still the
  current tree's. Task size, batch size, the intake's queue limit and linger are the code's own unless given.

Steps
  1. warm-up: one event per image (--images distinct ones); their embeddings are the model's own.
  2. --catalogue N > 0: N listings seeded by COPY as already enriched by the model (status 'enriched',
     enriched_hash, enriched_by), each embedding one of the warm-up's plus noise (the model's own
     distribution, so the snapshot's IVF lists fit what the model writes next), written a day ago (older
     than any snapshot's read time less similar.delta.ONLINE_SLACK), then `enrich reindex` (from the code tree
     under test) builds a similar-items snapshot. N = 0: the catalogue grows from empty, no snapshot.
  3. capacity: a burst of --burst events produced at once; capacity = the slope of the settled count
     between 10 % and 90 % of the burst (as soak.py measures it), unless --capacity gives it.
  4. per share: a producer at share x capacity for --minutes (each event carrying its produce time), then a
     drain (bounded by --drain-timeout: lag 0 and every event of the phase settled). Phases follow one
     another on the same, growing catalogue; each phase records the catalogue it ran on.

Figures, per --window s of each phase (windows.csv) and per phase (summary.json)
  produced/s    events the producer sent in the window
  enriched/s    the phase's listings that became 'enriched' in the window (listings.updated_at)
  lag           consumer lag in events (sum over partitions of end offset - committed offset), sampled every
                --sample-every s (soak.py's Sampler: the topic's end read first, then the committed offsets):
                the window's maximum and its last sample
  queue         tasks waiting in the GPU queue (RabbitMQ's ready count), the window's maximum: the
                backlog the lag does not show while the intake is not paused (ENRICH_MAX_QUEUE_DEPTH)
  latency       event → row: produce time (in the event's title) → listings.updated_at of the enriched row,
                p50/p99 over the events produced in the window
  task time     mean of Celery's "Task enrich.listings[...] succeeded in X s" lines logged in the window
  per task      mean N of the worker's "batch of N: ..." lines logged in the window
  busy          the worker's share of the window spent in task bodies (sum of task times / window): low
                while the queue holds tasks means the time goes between tasks, not in them
  RSS           `enrich consume` and `enrich worker` (with children), MiB, the window's last sample
  kept up       enriched/s >= 95 % of produced/s over the production time
  lag bounded   the lag at the end of production is at most 2 s of events (2 x rate, at least 10)
  task time     growing when the last window's mean is more than 1.25 x the first window's, else flat
It prints `lscpu | head` with the figures: compare only figures measured on one machine.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.soak import (  # noqa: E402 - after the path insert (soak.py also chdirs to ROOT)
    Producer,
    Sampler,
    Supervisor,
    _interrupt,
    cpu_model,
    enriched_times,
    log,
    lscpu_head,
    now,
    pct,
    tail_bytes,
    wait_drained,
)
from harness import cluster  # noqa: E402 - after the path insert
from harness.models import save_small_model  # noqa: E402 - after the path insert

MODEL_VERSION = "steady-small-v1"
TASK_DONE = re.compile(r"Task enrich\.listings\[[^\]]+\] succeeded in ([0-9.eE+-]+)s")
BATCH = re.compile(r"batch of (\d+):")
LOG_TIME = re.compile(r"^\[?(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)[,.](\d{3})")
GROWING = 1.25        # last window's task time over the first's above this: "growing"
KEPT_UP = 0.95        # enriched/s over produced/s at or above this: "kept up"
LAG_BOUND_S = 2.0     # a lag of at most this many seconds of events at the end of production: "bounded"
P99_GOAL_S = 2.0


# ------------------------------------------------------------------------------------------------ setup
def catalogue_label(n: int) -> str:
    if n == 0:
        return "empty"
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout.strip()


def make_worktree(rev: str) -> Path:
    """A detached worktree of `rev` in a fresh temporary folder (its parent is removed with it)."""
    path = Path(tempfile.mkdtemp(prefix="enrich-baseline-")) / "tree"
    git("worktree", "add", "--detach", str(path), rev)
    return path


def remove_worktree(path: Path) -> None:
    try:
        git("worktree", "remove", "--force", str(path))
    except subprocess.CalledProcessError as exc:
        log(f"git worktree remove failed ({exc.stderr.strip()}); removing the folder and pruning")
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
    shutil.rmtree(path.parent, ignore_errors=True)


def code_origin(stack: cluster.Stack) -> str:
    """Where the processes' interpreter finds the project's code (proves a baseline really runs the worktree)."""
    code = "import similar.online, worker.intake; print(similar.online.__file__)"
    done = subprocess.run([sys.executable, "-c", code],
                          cwd=stack.root or ROOT, env=stack.env(), capture_output=True, text=True, timeout=120)
    return (done.stdout.strip() or done.stderr.strip()[-300:])


def private_database(pg: cluster.PrivatePostgres) -> str:
    """Database `enrich` on the private server, migrated by the current tree (no audit triggers: they would
    add a write per embedding that production does not have)."""
    import psycopg

    from migrations import apply_all

    with psycopg.connect(pg.admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{pg.dbname}"')
    with psycopg.connect(pg.url, autocommit=True) as conn:
        apply_all(conn)
    return pg.url


def wait_ready(stack: cluster.Stack, sup: Supervisor, consumers: int = 1, timeout: float = 180) -> None:
    deadline = now() + timeout
    while True:
        sup.tick()
        try:
            state = cluster.group_members(stack.kafka, stack.group)
        except Exception:
            state = None
        ready = all("ready." in tail_bytes(s.proc.log, 1 << 16) for s in sup.slots if s.role == "worker")
        if state == ("Stable", consumers) and ready:
            return
        if now() > deadline:
            raise RuntimeError(f"processes not ready in {timeout:.0f} s: group {state}, worker ready {ready}\n"
                               + "\n".join(f"--- {s.name}:\n{s.proc.tail(15)}" for s in sup.slots))
        time.sleep(0.5)


def wait_settled(stack: cluster.Stack, sup: Supervisor, ids: list[str], timeout: float) -> list[tuple[float, int]]:
    """Poll the settled count of `ids` until all are settled; returns the (time, count) points."""
    points = []
    deadline = now() + timeout
    while True:
        sup.tick()
        n = cluster.settled_count(stack.pg_url, ids) or 0
        points.append((now(), n))
        if n >= len(ids):
            return points
        if now() > deadline:
            raise RuntimeError(f"{len(ids) - n} of {len(ids)} events not settled in {timeout:.0f} s\n"
                               + "\n".join(f"--- {s.name}:\n{s.proc.tail(15)}" for s in sup.slots))
        time.sleep(0.25)


def model_vectors(pg_url: str):
    """The embeddings the model gave the listings enriched so far (the warm-up's: one per image)."""
    import numpy as np
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute("SELECT vector FROM embeddings WHERE model_version = %s", (MODEL_VERSION,)).fetchall()
    return np.stack([np.frombuffer(r[0], "<f4") for r in rows])


def seed_catalogue(pg_url: str, n: int, basis, uris: list[str], chunk: int = 20_000) -> float:
    """N enriched listings by COPY, their embeddings near the model's own (a random one of `basis` plus noise,
    so the snapshot's IVF lists fit what the model writes next); returns the seconds it took."""
    import numpy as np
    import psycopg

    t0 = now()
    rng = np.random.default_rng(38)
    # noise on the scale of the model's own spread: a small random model maps every image near one point, and
    # noise beyond that spread would put the catalogue where the model never writes
    dim = basis.shape[1]
    pick = basis[rng.integers(0, len(basis), (2, 2000))]
    noise = 0.25 * float(np.median(np.linalg.norm(pick[0] - pick[1], axis=1))) / dim ** 0.5
    # a day old: older than any snapshot's read time less the online path's slack, as a catalogue built up
    # before the last nightly reindex would be
    written = datetime.now(UTC) - timedelta(days=1)
    with psycopg.connect(pg_url) as conn, conn.cursor() as cur:
        with cur.copy("COPY listings (listing_id, seller_id, event, content_hash, status, enriched_hash,"
                      " enriched_by, received_at, updated_at) FROM STDIN") as copy:
            for i in range(n):
                lid = f"cat-{i:08d}"
                event = json.dumps(cluster.listing_event(lid, [uris[i % len(uris)]]), separators=(",", ":"))
                h = hashlib.sha256(event.encode()).hexdigest()
                copy.write_row((lid, f"seller-{i % 5000:05d}", event, h, "enriched", h, MODEL_VERSION, written,
                                written))
        with cur.copy("COPY embeddings (listing_id, model_version, dim, vector, created_at) FROM STDIN"
                      " (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "int4", "bytea", "timestamptz"])
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                v = basis[rng.integers(0, len(basis), m)] + noise * rng.standard_normal((m, dim))
                v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
                v = v.astype("<f4")
                for j in range(m):
                    copy.write_row((f"cat-{start + j:08d}", MODEL_VERSION, dim, v[j].tobytes(), written))
        conn.commit()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ANALYZE listings")  # plans as a catalogue with statistics would get them
        conn.execute("ANALYZE embeddings")
    return now() - t0


def reindex(stack: cluster.Stack, timeout: float) -> dict:
    t0 = now()
    done = subprocess.run([sys.executable, "-m", "enrich.cli", "reindex", "--model-version", MODEL_VERSION],
                          cwd=stack.root or ROOT, env=stack.env(), capture_output=True, text=True, timeout=timeout)
    out = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise RuntimeError(f"enrich reindex failed ({done.returncode}):\n{out[-3000:]}")
    said = [ln for ln in out.splitlines() if "active with top" in ln] or out.splitlines()[-1:]
    return {"seconds": round(now() - t0, 1), "output": said[-1].strip() if said else ""}


def catalogue_state(pg_url: str) -> dict:
    """Embeddings of the model, and how many were written after the active snapshot read the catalogue."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        snap = conn.execute(
            "SELECT coalesce(v.snapshot_at, v.created_at) FROM similar_items_active a"
            " JOIN similar_items_versions v ON v.version = a.version WHERE a.model_version = %s",
            (MODEL_VERSION,)).fetchone()
        snap_at = snap[0] if snap else None
        total, since = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE %s::timestamptz IS NULL OR created_at > %s::timestamptz)"
            " FROM embeddings WHERE model_version = %s", (snap_at, snap_at, MODEL_VERSION)).fetchone()
    return {"embeddings": total, "since_snapshot": since, "snapshot_at": snap_at.isoformat() if snap_at else None}


# ------------------------------------------------------------------------------------------------ analysis
def parse_worker_log(path: Path) -> tuple[list[tuple[float, float]], list[tuple[float, int]]]:
    """([(time, task seconds)], [(time, listings in the task)]) from the worker's log (local-time stamps)."""
    done, batches = [], []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return done, batches
    for line in text.splitlines():
        m = LOG_TIME.match(line)
        if not m:
            continue
        task, batch = TASK_DONE.search(line), BATCH.search(line)
        if not task and not batch:
            continue
        t = time.mktime(time.strptime(f"{m.group(1)} {m.group(2)}", "%Y-%m-%d %H:%M:%S")) + int(m.group(3)) / 1000
        if task:
            done.append((t, float(task.group(1))))
        if batch:
            batches.append((t, int(batch.group(1))))
    return done, batches


def mean(values) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def rnd(v, digits: int = 3):
    return None if v is None else round(v, digits)


def analyse_phase(ph: dict, sampler: Sampler, tasks, batches, done_at: dict[str, float], window: float) -> None:
    """Fill ph["windows"] and ph["summary"] (ph holds t_start, t_end, rate, sent_at, ...)."""
    t0, t1, sent = ph["t_start"], ph["t_end"], ph["sent_at"]
    samples = [s for s in sampler.samples if t0 <= s["t"] <= t1]
    windows = []
    k = 0
    while t0 + k * window < t1 - 1e-6:
        a, b = t0 + k * window, min(t0 + (k + 1) * window, t1)
        span = b - a
        ids = [i for i, t in sent.items() if a <= t < b]
        lat = [done_at[i] - sent[i] for i in ids if i in done_at]
        ss = [s for s in samples if a <= s["t"] < b] or [s for s in samples if s["t"] <= b][-1:]
        lags = [s["lag"] for s in ss if s.get("lag") is not None]
        depth = [s["queue_depth"] for s in ss if s.get("queue_depth") is not None]
        tt = [x for t, x in tasks if a <= t < b]
        per = [x for t, x in batches if a <= t < b]
        last = ss[-1] if ss else {}
        windows.append({
            "phase": ph["index"], "share": ph["share"], "t_s": round(a - t0, 1), "span_s": round(span, 1),
            "t_min_overall": round((a - ph["t_origin"]) / 60, 3),
            "produced_per_s": round(len(ids) / span, 2),
            "enriched_per_s": round(sum(1 for i in sent if a <= done_at.get(i, -1) < b) / span, 2),
            "lag_max": max(lags) if lags else None, "lag_end": lags[-1] if lags else None,
            "queue_max": max(depth) if depth else None,
            "latency_p50_s": rnd(pct(lat, 0.5)), "latency_p99_s": rnd(pct(lat, 0.99)), "latency_n": len(lat),
            "not_enriched": len(ids) - len(lat),
            "tasks": len(tt), "task_s_mean": rnd(mean(tt)), "listings_per_task": rnd(mean(per), 2),
            "worker_busy": round(sum(tt) / span, 3),
            "task_s_per_listing": rnd(sum(tt) / sum(per), 4) if tt and per and sum(per) else None,
            "rss_consume_mib": rnd(last.get("rss:consume"), 1), "rss_worker_mib": rnd(last.get("rss:worker"), 1),
        })
        k += 1
    ph["windows"] = windows
    duration = t1 - t0
    ids = list(sent)
    lat = [done_at[i] - sent[i] for i in ids if i in done_at]
    enriched_in_time = sum(1 for i in ids if done_at.get(i, float("inf")) <= t1)
    lags = [s["lag"] for s in samples if s.get("lag") is not None]
    lag_end = lags[-1] if lags else None
    bound = max(10.0, LAG_BOUND_S * ph["rate"])
    tt_all = [x for t, x in tasks if t0 <= t < t1]
    per_all = [x for t, x in batches if t0 <= t < t1]
    first = next((w["task_s_mean"] for w in windows if w["task_s_mean"] is not None), None)
    lastw = next((w["task_s_mean"] for w in reversed(windows) if w["task_s_mean"] is not None), None)
    p99s = [w["latency_p99_s"] for w in windows if w["latency_p99_s"] is not None]
    rss = {}
    for name in ("consume", "worker"):
        vals = [s.get(f"rss:{name}") for s in samples if s.get(f"rss:{name}") is not None]
        rss[name] = {"start_mib": rnd(vals[0], 1) if vals else None, "end_mib": rnd(vals[-1], 1) if vals else None}
    produced_rate = len(ids) / duration if duration else 0.0
    enriched_rate = enriched_in_time / duration if duration else 0.0
    ph["summary"] = {
        "phase": ph["index"], "share": ph["share"], "rate_events_per_s": round(ph["rate"], 2),
        "minutes": round(duration / 60, 2), "produced": len(ids),
        "catalogue_at_start": ph["catalogue_start"], "catalogue_at_end": ph["catalogue_end"],
        "produced_per_s": round(produced_rate, 2), "enriched_per_s": round(enriched_rate, 2),
        "kept_up": bool(produced_rate and enriched_rate >= KEPT_UP * produced_rate),
        "lag_max": max(lags) if lags else None, "lag_at_end": lag_end, "lag_bound": bound,
        "queue_max": max((w["queue_max"] for w in windows if w["queue_max"] is not None), default=None),
        "lag_bounded": lag_end is not None and lag_end <= bound,
        "latency_p50_s": rnd(pct(lat, 0.5)), "latency_p99_s": rnd(pct(lat, 0.99)),
        "latency_max_s": rnd(max(lat) if lat else None), "worst_window_p99_s": rnd(max(p99s) if p99s else None),
        "p99_le_goal_every_window": bool(p99s) and max(p99s) <= P99_GOAL_S and all(
            w["latency_p99_s"] is not None for w in windows if w["produced_per_s"] > 0),
        "not_enriched": len(ids) - len(lat),
        "task_s_first_window": first, "task_s_last_window": lastw,
        "task_time": (None if first is None or lastw is None else
                      "growing" if lastw > GROWING * first else "flat"),
        "task_s_mean": rnd(mean(tt_all)), "tasks": len(tt_all), "listings_per_task": rnd(mean(per_all), 2),
        "worker_busy": round(sum(tt_all) / duration, 3) if duration else None,
        "rss": rss, "drained": ph.get("drained"), "drain_s": ph.get("drain_s"),
    }


# ------------------------------------------------------------------------------------------------ output
def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def print_phase(ph: dict) -> None:
    s, c = ph["summary"], ph["summary"]["catalogue_at_start"]
    print(f"\nphase {s['phase']}: share {s['share']:g} → {s['rate_events_per_s']} ev/s for {s['minutes']} min; "
          f"catalogue at start {c['embeddings']} embeddings, {c['since_snapshot']} since the snapshot"
          + ("" if c["snapshot_at"] else " (no snapshot)"))
    head = (f"{'t(s)':>6} {'prod/s':>7} {'enr/s':>7} {'lag':>6} {'queue':>5} {'p50(s)':>7} {'p99(s)':>7} "
            f"{'tasks':>5} {'task(s)':>8} {'/task':>6} {'busy':>5} {'RSS c':>6} {'RSS w':>6}")
    print(head)
    for w in ph["windows"]:
        print(f"{w['t_s']:>6.0f} {w['produced_per_s']:>7.2f} {w['enriched_per_s']:>7.2f} {fmt(w['lag_max'], '.0f'):>6} "
              f"{fmt(w['queue_max'], '.0f'):>5} {fmt(w['latency_p50_s']):>7} {fmt(w['latency_p99_s']):>7} "
              f"{w['tasks']:>5} {fmt(w['task_s_mean'], '.3f'):>8} {fmt(w['listings_per_task'], '.1f'):>6} "
              f"{w['worker_busy']:>5.0%} {fmt(w['rss_consume_mib'], '.0f'):>6} {fmt(w['rss_worker_mib'], '.0f'):>6}")


def print_summary(summary: dict) -> None:
    print("\n" + "=" * 136)
    print(f"{summary['label']}: code {summary['code']['rev']} ({summary['code']['root']}); CPU {summary['cpu_model']}")
    cap = summary["capacity"]
    given = {k: v for k, v in summary["settings"].items() if v is not None}
    print(f"capacity {cap['events_per_s']} ev/s ({cap['how']}); settings {given}, the rest the code's defaults")
    if summary.get("seed"):
        sd = summary["seed"]
        print(f"catalogue seeded: {sd['listings']} listings in {sd['seconds']} s; "
              f"reindex {sd['reindex']['seconds']} s: {sd['reindex']['output']}")
    head = (f"{'share':>5} {'ev/s':>6} {'catalogue':>10} {'since snap':>10} {'enr/s':>6} {'kept up':>7} "
            f"{'lag max':>7} {'lag end':>7} {'queue':>5} {'p50 s':>6} {'p99 s':>6} {'worst p99':>9} "
            f"{'task s 1st→last':>16} {'trend':>7} {'/task':>5} {'busy':>5} {'RSS c MiB':>11} {'RSS w MiB':>11}")
    print(head)
    for ph in summary["phases"]:
        s = ph["summary"]
        c = s["catalogue_at_start"]
        rc, rw = s["rss"]["consume"], s["rss"]["worker"]
        print(f"{s['share']:>5g} {s['rate_events_per_s']:>6.1f} {c['embeddings']:>10} {c['since_snapshot']:>10} "
              f"{s['enriched_per_s']:>6.1f} {'yes' if s['kept_up'] else 'NO':>7} {fmt(s['lag_max'], '.0f'):>7} "
              f"{fmt(s['lag_at_end'], '.0f'):>7} {fmt(s['queue_max'], '.0f'):>5} {fmt(s['latency_p50_s']):>6} "
              f"{fmt(s['latency_p99_s']):>6} "
              f"{fmt(s['worst_window_p99_s']):>9} "
              f"{fmt(s['task_s_first_window'], '.3f') + '→' + fmt(s['task_s_last_window'], '.3f'):>16} "
              f"{s['task_time'] or '-':>7} {fmt(s['listings_per_task'], '.1f'):>5} {fmt(s['worker_busy'], '.0%'):>5} "
              f"{fmt(rc['start_mib'], '.0f') + '→' + fmt(rc['end_mib'], '.0f'):>11} "
              f"{fmt(rw['start_mib'], '.0f') + '→' + fmt(rw['end_mib'], '.0f'):>11}")
    print(summary["verdict"]["line"])
    print("=" * 136)


def plot(path: Path, summary: dict, samples: list[dict], t_origin: float) -> None:
    """Lag, p99 latency, task time and listings per task over time, one panel each; phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(13, 12), sharex=True)
    ts = [(s["t"] - t_origin) / 60 for s in samples]
    axes[0].plot(ts, [s["lag"] if s.get("lag") is not None else float("nan") for s in samples], lw=1)
    axes[0].set_ylabel("consumer lag (events)")
    axes[0].set_yscale("symlog", linthresh=10)
    axes[0].set_ylim(bottom=0)

    def nan(v):
        return float("nan") if v is None else v

    for j, ph in enumerate(summary["phases"]):  # one line per phase: no line across a drain
        ws = ph["windows"]
        wt = [w["t_min_overall"] + w["span_s"] / 120 for w in ws]  # the window's middle
        first = j == 0
        axes[1].plot(wt, [nan(w["latency_p99_s"]) for w in ws], marker="o", ms=3, lw=1, color="tab:blue",
                     label="p99" if first else None)
        axes[1].plot(wt, [nan(w["latency_p50_s"]) for w in ws], marker=".", ms=3, lw=1, ls="--", color="tab:orange",
                     label="p50" if first else None)
        axes[2].plot(wt, [nan(w["task_s_mean"]) for w in ws], marker="o", ms=3, lw=1, color="tab:blue")
        axes[3].plot(wt, [nan(w["listings_per_task"]) for w in ws], marker="o", ms=3, lw=1, color="tab:blue")
    axes[1].axhline(P99_GOAL_S, color="grey", lw=0.8, ls=":", label=f"{P99_GOAL_S:g} s")
    axes[1].set_ylabel("event → row latency (s)")
    axes[1].set_yscale("log")
    axes[1].legend(loc="upper left", fontsize=8)
    axes[2].set_ylabel("task time, mean (s)")
    axes[2].set_ylim(bottom=0)
    axes[3].set_ylabel("listings per task, mean")
    axes[3].set_ylim(bottom=0)
    axes[3].set_xlabel(f"minutes since the first phase began (windows of {summary['args']['window']:g} s)")
    for ph in summary["phases"]:
        a, b = (ph["t_start"] - t_origin) / 60, (ph["t_end"] - t_origin) / 60
        for ax in axes:
            ax.axvspan(a, b, color="tab:blue" if ph["index"] % 2 else "tab:green", alpha=0.07)
        s = ph["summary"]
        axes[0].text(a, 1.0, f" {s['share']:g}× = {s['rate_events_per_s']:.1f} ev/s, "
                             f"{s['catalogue_at_start']['embeddings']} emb.", transform=axes[0].get_xaxis_transform(),
                     va="top", fontsize=8)
    axes[0].set_title(summary["plot_title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        # options without a default say in their help what applies instead
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Steady traffic at shares of the measured capacity, no faults, on private services: "
                    "per window lag, event→row latency, worker task time and listings per task, RSS; per phase "
                    "whether it kept up. Writes <out>/<label>/summary.json, windows.csv and steady_load.png. "
                    "See the module docstring for definitions.",
        formatter_class=_Help)
    p.add_argument("--shares", default="0.25,0.5,0.8",
                   help="comma-separated shares of the capacity, one phase each, in this order")
    p.add_argument("--minutes", type=float, default=10, help="minutes of production per phase")
    p.add_argument("--catalogue", type=int, default=0,
                   help="listings seeded as already enriched (embeddings near the model's own) before the load, then "
                        "`enrich reindex`; 0: the catalogue grows from empty, no snapshot")
    p.add_argument("--capacity", type=float, default=None,
                   help="events/s the phases' shares are of; default: measured by a burst of --burst events (the "
                        "slope of the settled count between 10%% and 90%%). Give the same value to compare runs")
    p.add_argument("--burst", type=int, default=1000, help="events of the capacity burst")
    p.add_argument("--baseline", action="store_true",
                   help="run `enrich consume` and `enrich worker` (and reindex) from a git worktree of --baseline-rev")
    p.add_argument("--baseline-rev", default="3b18662", help="git revision for --baseline")
    p.add_argument("--label", default=None,
                   help="results subfolder; default: new-<catalogue> or baseline-<catalogue>, e.g. baseline-200k")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "steady_load",
                   help="results folder (relative paths: from the repository root)")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between lag/RSS samples")
    p.add_argument("--window", type=float, default=30.0, help="seconds per reported window")
    p.add_argument("--images", type=int, default=4096,
                   help="distinct images the events name (PNG colours and noise JPEGs), so embeddings vary")
    p.add_argument("--task-listings", type=int, default=None,
                   help="ENRICH_TASK_LISTINGS (listing ids per task; default: the code's own)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="ENRICH_BATCH_SIZE (images per forward pass; default: the code's own)")
    p.add_argument("--max-queue-depth", type=int, default=None,
                   help="ENRICH_MAX_QUEUE_DEPTH: the intake pauses above this many queued tasks (default: the "
                        "code's own, 1000; soak.py uses 8)")
    p.add_argument("--linger-ms", type=int, default=None,
                   help="ENRICH_INTAKE_LINGER_MS for the intake (default: the code's own; code without it ignores it)")
    p.add_argument("--drain-timeout", type=float, default=300, help="most seconds to wait after each phase for lag 0 "
                                                                     "and every event of the phase settled")
    p.add_argument("--reindex-timeout", type=float, default=3600, help="most seconds for `enrich reindex`")
    p.add_argument("--keep", action="store_true", help="keep the private services' folder (logs, data)")
    args = p.parse_args(argv)
    try:
        args.share_list = [float(x) for x in args.shares.split(",") if x.strip()]
    except ValueError:
        p.error(f"--shares: comma-separated numbers, not {args.shares!r}")
    if not args.share_list or any(s <= 0 for s in args.share_list):
        p.error("--shares: at least one share, each > 0")
    if args.catalogue < 0 or args.minutes <= 0 or args.window <= 0 or args.sample_every <= 0:
        p.error("--catalogue >= 0, --minutes, --window and --sample-every > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    label = args.label or f"{'baseline' if args.baseline else 'new'}-{catalogue_label(args.catalogue)}"
    out = (args.out if args.out.is_absolute() else ROOT / args.out) / label
    out.mkdir(parents=True, exist_ok=True)
    cpu = lscpu_head()
    print(cpu, flush=True)
    base = cluster.service_dir("enrich-steady-")
    log(f"{label}: private services and logs under {base}")
    tree = pg = rabbit = kafka = s3 = stack = sup = sampler = None
    producers: list[Producer] = []
    ok = False
    # None leaves the code's default (cluster.Stack drops it)
    settings = dict(max_queue_depth=args.max_queue_depth, task_listings=args.task_listings,
                    batch_size=args.batch_size, intake_linger_ms=args.linger_ms, retry_backoff_s=1,
                    task_max_retries=8, fetch_timeout_s=3)
    summary: dict = {"label": label, "command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "cpu": cpu,
                     "cpu_model": cpu_model(cpu), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                     "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "settings": settings, "model_version": MODEL_VERSION}
    try:
        if args.baseline:
            tree = make_worktree(args.baseline_rev)
            rev = git("rev-parse", "--short", "HEAD", cwd=tree)
            log(f"baseline code: worktree of {args.baseline_rev} ({rev}) at {tree}")
        else:
            rev = git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if git("status", "--porcelain",
                                                                                       "--untracked-files=no") else "")
        model_dir = save_small_model(base / "model", MODEL_VERSION, seed=0)
        objects = cluster.image_objects(f"steady-{uuid.uuid4().hex[:8]}", n=args.images)
        pg = cluster.PrivatePostgres(base)
        pg.start()
        private_database(pg)
        rabbit = cluster.PrivateRabbit(base)
        rabbit.start()
        kafka = cluster.PrivateKafka(base)
        kafka.start()
        s3 = cluster.PrivateS3(base, objects)
        s3.start()
        log(f"services up: pg {pg.port}, rabbit {rabbit.port}, kafka {kafka.port}, s3 {s3.port}")
        stack = cluster.Stack(pg.url, kafka.bootstrap, rabbit.url, s3.url, model_dir, base,
                              images=cluster.image_uris(objects), settings=settings, root=tree)
        summary["code"] = {"rev": rev, "root": str(tree or ROOT), "imports_from": code_origin(stack)}
        log(f"processes import the project from {summary['code']['imports_from']}")
        cluster.create_topic(stack.kafka, stack.topic, 4)
        producer = Producer(stack.kafka, stack.topic, stack.images, "warm")
        producers.append(producer)
        sup = Supervisor(stack, restart_delay=2.0)
        sup.add("worker", "worker")
        sup.add("consume", "consumer")
        # the cpu queue's worker, as production runs one: it serves the reindex a worker asks for when its
        # online delta outgrows exact search (code without that never asks)
        stack._start("cpu-worker", ["worker", "--queues=cpu", "--loglevel=INFO"], False)
        sampler = Sampler(stack, sup, args.sample_every)
        sampler.start()
        wait_ready(stack, sup)
        log("processes ready")

        # 1. warm-up: one event per image through the whole pipeline: the model's own embeddings
        wait_settled(stack, sup, producer.good(len(stack.images), prefix="warm"), 300)
        basis = model_vectors(stack.pg_url)
        summary["embedding_dim"] = dim = basis.shape[1]

        # 2. catalogue
        if args.catalogue:
            log(f"seeding {args.catalogue} enriched listings ({dim}-dimensional embeddings)")
            seconds = seed_catalogue(stack.pg_url, args.catalogue, basis, stack.images)
            log(f"seeded in {seconds:.1f} s; `enrich reindex`")
            ri = reindex(stack, args.reindex_timeout)
            log(f"reindex: {ri['output']} ({ri['seconds']} s)")
            summary["seed"] = {"listings": args.catalogue, "seconds": round(seconds, 1), "reindex": ri}

        # 3. capacity
        if args.capacity:
            capacity = args.capacity
            summary["capacity"] = {"events_per_s": capacity, "how": "given (--capacity)"}
        else:
            t_burst = now()
            burst = producer.good(args.burst, prefix="burst")
            log(f"burst of {len(burst)} produced in {now() - t_burst:.1f} s")
            points = wait_settled(stack, sup, burst, 900)
            lo = next((t for t, n in points if n >= 0.1 * len(burst)), None)
            hi = next((t for t, n in points if n >= 0.9 * len(burst)), None)
            if lo is None or hi is None or hi <= lo:
                raise RuntimeError(f"could not measure the capacity from the burst: {points[-5:]}")
            capacity = 0.8 * len(burst) / (hi - lo)
            summary["capacity"] = {"events_per_s": round(capacity, 2), "events": len(burst),
                                   "how": f"burst of {len(burst)}, slope of the settled count 10-90 %",
                                   "burst_wall_s": round(points[-1][0] - t_burst, 1)}
            wait_drained(stack.pg_url, burst, sampler, sup, args.drain_timeout, 60)
        log(f"capacity {capacity:.1f} events/s ({summary['capacity']['how']})")

        # 4. phases
        phases: list[dict] = []
        t_origin = None
        for i, share in enumerate(args.share_list, 1):
            rate = share * capacity
            cat = catalogue_state(stack.pg_url)
            log(f"phase {i}/{len(args.share_list)}: share {share:g} → {rate:.2f} events/s for {args.minutes:g} min; "
                f"{cat['embeddings']} embeddings, {cat['since_snapshot']} since the snapshot")
            p = Producer(stack.kafka, stack.topic, stack.images, f"s{i}")
            producers.append(p)
            t_start = now()
            t_origin = t_origin or t_start
            sup.t0 = t_start
            p.start_soak(rate, args.minutes * 60, 0)
            last_print = t_start
            while p.is_alive():
                sup.tick()
                if now() - last_print >= 60:
                    last_print = now()
                    s = sampler.samples[-1] if sampler.samples else {}
                    log(f"  t+{(now() - t_start) / 60:.1f} min: produced {len(p.sent_at)}, lag {s.get('lag')}, "
                        f"queue {s.get('queue_depth')}, pending {s.get('pending')}")
                time.sleep(0.5)
            t_end = min(now(), t_start + args.minutes * 60)  # the producer's last send, not its flush
            if p.error:
                raise RuntimeError(f"producer failed:\n{p.error}")
            ids = sorted(p.acked)
            drained = wait_drained(stack.pg_url, ids, sampler, sup, args.drain_timeout, 120)
            phases.append({"index": i, "share": share, "rate": rate, "t_start": t_start, "t_end": t_end,
                           "t_origin": t_origin, "sent_at": dict(p.sent_at), "catalogue_start": cat,
                           "catalogue_end": catalogue_state(stack.pg_url), "drained": drained,
                           "drain_s": round(now() - t_end, 1)})
            log(f"phase {i} done: {len(ids)} events, drained {'yes' if drained else 'NO'} in {now() - t_end:.0f} s")
        sampler.stop()
        sampler.join(30)

        # 5. figures
        tasks, batches = parse_worker_log(sup.worker().proc.log)
        all_ids = [k for ph in phases for k in ph["sent_at"]]
        done_at = enriched_times(stack.pg_url, all_ids)
        for ph in phases:
            analyse_phase(ph, sampler, tasks, batches, done_at, args.window)
        at80 = [ph["summary"] for ph in phases if abs(ph["share"] - 0.8) < 1e-9]
        if at80:
            s = at80[0]
            good = s["lag_bounded"] and s["p99_le_goal_every_window"]
            line = (f"at 80 % lag stays bounded and p99 <= {P99_GOAL_S:g} s in every window: "
                    f"{'YES' if good else 'NO'} (lag at end {fmt(s['lag_at_end'], '.0f')} <= {s['lag_bound']:.0f}: "
                    f"{'yes' if s['lag_bounded'] else 'no'}; worst window p99 {fmt(s['worst_window_p99_s'])} s)")
        else:
            good, line = None, "at 80 %: no phase at share 0.8 in this run"
        summary["verdict"] = {"at_80pct_bounded_and_p99_le_2s": good, "line": line}
        summary["unplanned_exits"] = sup.unplanned
        summary["service_dir"] = str(base)
        summary["t_origin"] = t_origin
        summary["phases"] = [{k: v for k, v in ph.items() if k != "sent_at"} for ph in phases]
        cat_note = "empty start" if not args.catalogue else f"{args.catalogue} seeded + snapshot"
        summary["plot_title"] = (f"steady load {label}: code {rev}; {cat_note}; capacity {capacity:.1f} ev/s; "
                                 f"{args.minutes:g} min per share; {cpu_model(cpu)}")
        with (out / "windows.csv").open("w", newline="") as f:
            rows = [w for ph in phases for w in ph["windows"]]
            w = csv.DictWriter(f, list(rows[0]) if rows else ["phase"])
            w.writeheader()
            w.writerows(rows)
        plot(out / "steady_load.png", summary, sampler.samples, t_origin)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        for ph in phases:
            print_phase(ph)
        print_summary(summary)
        if sup.unplanned:
            print(f"{len(sup.unplanned)} unplanned process exit(s) (restarted): see summary.json unplanned_exits")
        print(f"\nwritten: {out / 'summary.json'}, {out / 'windows.csv'}, {out / 'steady_load.png'}")
        ok = True
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception:
        log(f"FAILED:\n{traceback.format_exc()}")
        if sup is not None:
            for s in sup.slots:
                if s.proc is not None:
                    print(f"--- {s.name} ({'alive' if s.proc.alive else s.proc.returncode}):\n{s.proc.tail(25)}")
        return 1
    finally:
        if sampler is not None:
            sampler.stop()
        for p in producers:
            p.stop()
            p.close()
        if stack is not None:
            stack.close()
        for svc in (s3, kafka, rabbit, pg):
            if svc is not None:
                try:
                    svc.close()
                except Exception:
                    pass
        if tree is not None:
            remove_worktree(tree)
        if args.keep or not ok:
            print(f"kept {base} (process logs *.log, service data)")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
