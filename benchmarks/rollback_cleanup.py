"""How long a rollback takes to clean the catalogue of the rolled-back model, against enriching it in the first place.

    python benchmarks/rollback_cleanup.py [--listings 10000] [--backbone small_cnn] [--image-size 32]

Real parts, one process (torch on --threads intra-op threads), a scratch database on the real Postgres:
  1. baseline: N listings (JPEG files on disk) enriched under model A, the first time, by
     `worker.backfill.run_inline` (chunks of --task-listings, as the "enrich.backfill" chain runs them);
  2. model B promoted and its backfill run (`run_inline`): B rewrites every listing;
  3. rollback to A (`model.registry.rollback`) and A's backfill (`run_inline`), timed from the rollback until
     "0 rows of the bad version left": predicted tags + open review items with model_version B.
Prints both times, the rows of B before and after, and ratio = rollback cleanup ÷ baseline (the same work:
every listing through the model once, so about 1 is expected); writes them as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.backfill_throughput import make_images, make_model  # noqa: E402 - after the path


def bad_rows(conn: psycopg.Connection, model_version: str) -> int:
    """Predicted tags and open review items the version wrote that are still there."""
    return conn.execute(
        "SELECT (SELECT count(*) FROM listing_tags WHERE source = 'predicted' AND model_version = %s)"
        " + (SELECT count(*) FROM review_queue WHERE resolved_at IS NULL AND model_version = %s)",
        (model_version, model_version)).fetchone()[0]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    cpus = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("CPU(s)")), "?")
    return f"{name}, {cpus} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listings", type=int, default=10_000, help="listings in the catalogue (default: 10000)")
    ap.add_argument("--backbone", default="small_cnn", help="model trunk (default: small_cnn)")
    ap.add_argument("--image-size", type=int, default=32, help="model input size (default: 32)")
    ap.add_argument("--photo-size", type=int, default=96, help="JPEG size on disk (default: 96)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    ap.add_argument("--task-listings", type=int, default=64, help="listings per backfill chunk (default: 64)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    ap.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="Postgres admin URL; a scratch database is created and dropped (default: local 5432)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rollback_cleanup.json",
                    help="JSON results file (default: benchmarks/results/rollback_cleanup.json)")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from core.config import Settings
    from migrations import apply_all
    from model.inference import load_predictor
    from model.registry import promote, register_candidate, rollback
    from schemas.events import ListingEvent
    from worker.backfill import run_inline
    from worker.pipeline import Enricher
    from worker.store import upsert_listings

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-rollback-"))
    dbname = f"bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(args.pg_admin, autocommit=True)
    admin.execute(f'CREATE DATABASE "{dbname}"')
    pg_url = psycopg.conninfo.make_conninfo(args.pg_admin, dbname=dbname)
    good, bad = "bench-good", "bench-bad"
    try:
        with psycopg.connect(pg_url) as conn:
            apply_all(conn)
        settings = Settings(database_url=pg_url, data_dir=work / "data", allow_local_paths=True, device="cpu",
                            torch_threads=args.threads, batch_size=args.batch_size, task_listings=args.task_listings,
                            mixed_precision=False)
        models = {v: make_model(work / v, v, seed, args.backbone, args.image_size)
                  for seed, v in enumerate((good, bad))}
        images = make_images(work / "images", args.listings, args.photo_size)
        db = psycopg.connect(pg_url, autocommit=True)
        with db.transaction():
            upsert_listings(db, [ListingEvent(listing_id=f"rb-{i:05d}", seller_id="bench", images=[str(p)])
                                 for i, p in enumerate(images)])

        def enricher(version: str) -> Enricher:
            e = Enricher(load_predictor(models[version], device="cpu", mixed_precision=False), settings)
            e.forward([e.predictor.preprocess(Image.new("RGB", (8, 8)))] * 2)  # warm-up
            return e

        def backfill(version: str) -> tuple[float, float]:
            e = enricher(version)
            t0, c0 = time.perf_counter(), time.process_time()
            done = run_inline(db, e, settings)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            e.close()
            assert done is not None and done.status == "done" and done.done == args.listings, done
            return wall, cpu

        # 1. the first enrichment, under A
        register_candidate(db, models[good], actor="bench")
        promote(db, good, actor="bench")
        base_wall, base_cpu = backfill(good)

        # 2. B promoted (its stored figure is higher: the gate lets it through) and its backfill
        register_candidate(db, models[bad], actor="bench")
        assert promote(db, bad, actor="bench").promoted
        bad_wall, _ = backfill(bad)
        rows_before = bad_rows(db, bad)

        # 3. rollback to A, timed until no row of B is left
        e = enricher(good)
        t0, c0 = time.perf_counter(), time.process_time()
        rollback(db, good, actor="bench", reason="worse than it looked")
        done = run_inline(db, e, settings)
        rows_after = bad_rows(db, bad)
        cleanup_wall, cleanup_cpu = time.perf_counter() - t0, time.process_time() - c0
        e.close()
        assert done is not None and done.status == "done", done
        assert rows_after == 0, f"{rows_after} rows of {bad} left after the rollback's backfill"
        db.close()

        n = args.listings
        results = {
            "listings": n, "cpu": cpu_name(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "backbone": args.backbone, "image_size": args.image_size, "photo_size": args.photo_size,
            "batch_size": args.batch_size, "task_listings": args.task_listings, "threads": args.threads,
            "baseline_s": round(base_wall, 2), "baseline_cpu_s": round(base_cpu, 2),
            "promotion_backfill_s": round(bad_wall, 2),
            "rollback_cleanup_s": round(cleanup_wall, 2), "rollback_cleanup_cpu_s": round(cleanup_cpu, 2),
            "bad_rows_before": rows_before, "bad_rows_after": rows_after,
            "ratio": round(cleanup_wall / base_wall, 3),
        }
        print(f"{'phase':<44}{'seconds':>9}{'listings/s':>12}")
        for label, wall in ((f"first enrichment under A ({n} listings)", base_wall),
                            ("promotion backfill under B", bad_wall),
                            ("rollback to A until 0 rows of B left", cleanup_wall)):
            print(f"{label:<44}{wall:>9.1f}{n / wall:>12.1f}")
        print(f"rows of B (predicted tags + open review items): {rows_before} before the rollback, {rows_after} after")
        print(f"ratio rollback cleanup / first enrichment: {results['ratio']:.2f} "
              f"(per CPU-second {cleanup_cpu / base_cpu:.2f}); {results['cpu']}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"written: {args.out}")
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        admin.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
