"""Sharded nightly reindex (`enrich reindex --shards N`) end to end with 1, then 2 Celery worker processes.

    nice -n 10 python benchmarks/similar_shards.py --n 1000000             # 1 M × 256-d, top-20, 4 shards
    nice -n 10 python benchmarks/similar_shards.py --n 300000 --workers 1 2 3

What it does (all on this machine: Postgres at ENRICH_TEST_PG_ADMIN_URL, RabbitMQ as broker, Redis as result
backend):
  1. creates a throwaway database and loads n listings with clustered unit vectors, exactly as
     benchmarks/similar_nightly.py does (its functions; not timed);
  2. for each worker count W: starts W `enrich worker -Q <queue> --concurrency 1` processes sharing one
     snapshot directory, sends "enrich.reindex" with --shards S, and follows the version's row in Postgres:
     prepare (read + build + snapshot, one worker), shards (S shard tasks over the W workers: snapshot load,
     range read, search, COPY), finish (the check, the switch, pruning); then stops the workers;
  3. prints the phases, each shard's time and worker (from the workers' logs), the ratio of the W = 1 run
     to each other run, and the load average; drops the database.
Phases are read from the version row every 0.1 s, so each is known to about that.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.similar_nightly import ADMIN_URL, MODEL, load_db, make_vectors  # noqa: E402

AMQP = os.environ.get("ENRICH_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
REDIS = os.environ.get("ENRICH_TEST_REDIS_BACKEND", "redis://127.0.0.1:6379/1")
SHARD_DONE = re.compile(r"Task enrich\.reindex_shard\[[^\]]+\] succeeded in ([0-9.]+)s: (\d+)")


def start_workers(count: int, env: dict, logs: Path) -> list[tuple[subprocess.Popen, Path]]:
    procs = []
    for i in range(count):
        log = logs / f"worker-{count}-{i}.log"
        cmd = [sys.executable, "-m", "enrich.cli", "worker", "--queues", env["ENRICH_CPU_QUEUE"],
               "--concurrency", "1", "--hostname", f"bench-{i}-{uuid.uuid4().hex[:6]}@%h"]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                       stderr=log.open("w")), log))
    deadline = time.monotonic() + 120
    while not all(" ready." in log.read_text() for _, log in procs):
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in procs):
            raise SystemExit(f"workers did not start; see {logs}")
        time.sleep(0.2)
    return procs


def stop_workers(procs) -> None:
    for proc, _ in procs:
        proc.terminate()
    for proc, _ in procs:
        proc.wait(60)


def run_once(url: str, env: dict, workers: int, shards: int, k: int, logs: Path) -> dict:
    """One sharded reindex with `workers` worker processes; the phases' wall times."""
    import psycopg

    from core.celery_app import REINDEX_TASK, app, configure
    from core.config import Settings

    procs = start_workers(workers, env, logs)
    try:
        configure(Settings(celery_broker_url=AMQP, celery_result_backend=REDIS, cpu_queue=env["ENRICH_CPU_QUEUE"]))
        with psycopg.connect(url, autocommit=True) as conn:
            before = conn.execute("SELECT coalesce(max(version), 0) FROM similar_items_versions").fetchone()[0]
            t0 = time.perf_counter()
            app.send_task(REINDEX_TASK, queue=env["ENRICH_CPU_QUEUE"],
                          kwargs={"model_version": MODEL, "k": k, "shards": shards})
            marks: dict[str, float] = {}
            while True:
                row = conn.execute("SELECT status, params FROM similar_items_versions WHERE version > %s"
                                   " ORDER BY version DESC LIMIT 1", (before,)).fetchone()
                now = time.perf_counter() - t0
                if row is not None:
                    status, params = row
                    if "shards" in params:
                        marks.setdefault("prepared", now)
                    if len(params.get("written", {})) == shards:
                        marks.setdefault("shards_written", now)
                    if status == "failed":
                        raise SystemExit(f"the reindex failed: {params.get('error')}")
                    if status != "building":
                        marks["switched"] = now
                        break
                time.sleep(0.1)
        load = os.getloadavg()[0]
    finally:
        stop_workers(procs)
    per_shard = []
    for i, (_, log) in enumerate(procs):
        per_shard += [{"worker": i, "s": float(s), "rows": int(n)} for s, n in SHARD_DONE.findall(log.read_text())]
    return {"workers": workers, "shards": shards, "total_s": marks["switched"], "prepare_s": marks["prepared"],
            "shards_s": marks["shards_written"] - marks["prepared"],
            "finish_s": marks["switched"] - marks["shards_written"], "shard_tasks": per_shard,
            "shard_task_s_sum": sum(s["s"] for s in per_shard), "load_avg_1m": round(load, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="listings (default: 1,000,000)")
    ap.add_argument("--dim", type=int, default=256, help="embedding dimension (default: 256)")
    ap.add_argument("--k", type=int, default=20, help="neighbours per listing (default: 20)")
    ap.add_argument("--shards", type=int, default=4, help="shards per run (default: 4)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts, in order (default: 1 2)")
    ap.add_argument("--clusters", type=int, default=None, help="synthetic clusters (default: n // 100)")
    ap.add_argument("--workdir", type=Path, default=None, help="vectors, snapshots, logs (default: a temp dir)")
    args = ap.parse_args()

    import psycopg

    from migrations import apply_all

    work = Path(args.workdir or tempfile.mkdtemp(prefix="similar-shards-"))
    work.mkdir(parents=True, exist_ok=True)
    name = f"enrich_bench_{uuid.uuid4().hex[:10]}"
    url = psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)
    env = {**os.environ, "ENRICH_DATABASE_URL": url, "ENRICH_CELERY_BROKER_URL": AMQP,
           "ENRICH_CELERY_RESULT_BACKEND": REDIS, "ENRICH_CPU_QUEUE": f"bench-cpu-{uuid.uuid4().hex[:8]}",
           "ENRICH_INDEX_DIR": str(work / "index"), "ENRICH_DATA_DIR": str(work / "data"),
           "PYTHONPATH": str(ROOT)}
    env.pop("ENRICH_INDEX_URI", None)  # one machine: the workers share the snapshot directory
    admin = psycopg.connect(ADMIN_URL, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    runs = []
    try:
        with psycopg.connect(url) as conn:
            apply_all(conn)
        t0 = time.perf_counter()
        make_vectors(args.n, args.dim, work / "vectors.npy", args.clusters or max(10, args.n // 100))
        load_db(url, work / "vectors.npy")
        (work / "vectors.npy").unlink()
        print(f"setup (generate + load + vacuum) {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        for w in args.workers:
            runs.append(run_once(url, env, w, args.shards, args.k, work))
            print(f"{w} worker(s): {json.dumps(runs[-1])}", file=sys.stderr)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    base = runs[0]
    figures = {"n": args.n, "dim": args.dim, "k": args.k, "shards": args.shards, "cpus": os.cpu_count(),
               "runs": runs, "speedup_total": {r["workers"]: round(base["total_s"] / r["total_s"], 3) for r in runs},
               "speedup_shards": {r["workers"]: round(base["shards_s"] / r["shards_s"], 3) for r in runs}}
    print(json.dumps(figures))
    print(f"\n{args.n:,} × {args.dim}-d, top-{args.k}, {args.shards} shards, on {os.cpu_count()} CPUs:")
    for r in runs:
        per = ", ".join(f"w{s['worker']} {s['s']:.1f}s" for s in r["shard_tasks"])
        print(f"  {r['workers']} worker(s): total {r['total_s']:.1f}s = prepare {r['prepare_s']:.1f}s + shards "
              f"{r['shards_s']:.1f}s + finish {r['finish_s']:.1f}s;  shard tasks {per} (sum "
              f"{r['shard_task_s_sum']:.1f}s);  ×{base['total_s'] / r['total_s']:.2f} total, "
              f"×{base['shards_s'] / r['shards_s']:.2f} shards phase;  load avg {r['load_avg_1m']}")


if __name__ == "__main__":
    main()
