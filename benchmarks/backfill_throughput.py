"""Catalogue backfill throughput against the live worker path, over the same listings, in one run.

    python benchmarks/backfill_throughput.py [--listings 300] [--backbone small_cnn] [--image-size 32]

Real parts, one process (torch on --threads intra-op threads):
  1. worker path: N listings (JPEG files on disk) enriched under model A by `Enricher.run` in chunks of
     --task-listings, as "enrich.listings" tasks run them (fetch + decode, forward, tags, one transaction,
     online neighbours): listings/s;
  2. backfill: model B promoted; the same N listings re-embedded under B by the "enrich.backfill" chain
     on a real solo Celery worker in this process (Redis broker), timed from the first send to the
     `backfills` row reading 'done' (the worker has B loaded before: a warm-up task): listings/s;
  3. backfill inline: model C promoted; `worker.backfill.run_inline` over the same listings, no broker
     (what the chain's per-chunk overhead costs: a broker round trip, the queue-depth check).
Prints each rate, per wall-clock second and per CPU-second of this process (Postgres and Redis not
counted), and ratio = backfill ÷ worker path. The backfill skips online neighbours (the reindex
builds the new model's shelves whole), so a ratio above 1 is expected.
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_model(out: Path, version: str, seed: int, backbone: str, image_size: int) -> Path:
    import torch

    from model.checkpoint import save_model
    from model.network import build_model
    from schemas.taxonomy import load_taxonomy

    torch.manual_seed(seed)
    model = build_model(backbone, load_taxonomy("fashion-mnist"), pretrained=False)
    save_model(model, out, model_version=version, image_size=image_size,
               thresholds={"category": 0.0, "type": 0.0, "colour": 0.5}, metrics={"test/top1": 0.1 * (seed + 1)})
    return out


def make_images(out: Path, n: int, size: int) -> list[Path]:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, 3)
        pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        p = out / f"img-{i:05d}.jpg"
        p.write_bytes(buf.getvalue())
        paths.append(p)
    return paths


def rate(n: int, wall: float, cpu: float) -> str:
    return f"{n / wall:8.1f} listings/s  ({n / max(cpu, 1e-9):8.1f} per CPU-second; {wall:.2f} s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listings", type=int, default=300, help="listings in the catalogue (default: 300)")
    ap.add_argument("--backbone", default="small_cnn", help="model trunk (default: small_cnn)")
    ap.add_argument("--image-size", type=int, default=32, help="model input size (default: 32)")
    ap.add_argument("--photo-size", type=int, default=96, help="JPEG size on disk (default: 96)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    ap.add_argument("--task-listings", type=int, default=64, help="listings per task / backfill chunk (default: 64)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/0", help="Celery broker (default: local Redis)")
    ap.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="Postgres admin URL; a scratch database is created and dropped (default: local 5432)")
    args = ap.parse_args()

    import torch
    from celery.contrib.testing.worker import start_worker
    from PIL import Image

    from core.celery_app import app, configure, send_enrich
    from core.config import Settings
    from migrations import apply_all
    from model.inference import load_predictor
    from model.registry import promote, register_candidate
    from schemas.events import ListingEvent
    from worker import backfill, runtime
    from worker.pipeline import Enricher
    from worker.store import upsert_listings

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    dbname = f"bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(args.pg_admin, autocommit=True)
    admin.execute(f'CREATE DATABASE "{dbname}"')
    pg_url = psycopg.conninfo.make_conninfo(args.pg_admin, dbname=dbname)
    tag = uuid.uuid4().hex[:6]
    gpu_q, bf_q, cpu_q = f"gpu-bench-{tag}", f"backfill-bench-{tag}", f"cpu-bench-{tag}"
    try:
        with psycopg.connect(pg_url) as conn:
            apply_all(conn)
        settings = Settings(database_url=pg_url, data_dir=work / "data", allow_local_paths=True, device="cpu",
                            torch_threads=args.threads, batch_size=args.batch_size, task_listings=args.task_listings,
                            celery_broker_url=args.broker, gpu_queue=gpu_q, model_check_s=0.5, backfill_pause_s=0.2,
                            mixed_precision=False)
        models = {v: make_model(work / v, v, seed, args.backbone, args.image_size)
                  for seed, v in enumerate(("bench-a", "bench-b", "bench-c"))}
        images = make_images(work / "images", args.listings + 1, args.photo_size)
        ids = [f"bl-{i:05d}" for i in range(args.listings)]
        db = psycopg.connect(pg_url, autocommit=True)
        with db.transaction():
            upsert_listings(db, [ListingEvent(listing_id=lid, seller_id="bench", images=[str(p)])
                                 for lid, p in zip(ids, images, strict=False)])  # the last image is the warm-up's
        register_candidate(db, models["bench-a"], actor="bench")
        promote(db, "bench-a", actor="bench")

        # 1. the live worker path, under model A
        enricher = Enricher(load_predictor(models["bench-a"], device="cpu", mixed_precision=False), settings)
        enricher.forward([enricher.predictor.preprocess(Image.new("RGB", (8, 8)))] * 2)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(ids), args.task_listings):
            out = enricher.run(db, ids[i:i + args.task_listings])
            assert not out.failed and not out.retry, (out.failed, out.retry)
        live_wall, live_cpu = time.perf_counter() - t0, time.process_time() - c0
        enricher.close()
        label = f"worker path (Enricher.run, {args.listings} listings):"
        print(f"{label:<46}{rate(args.listings, live_wall, live_cpu)}")

        # 2. the backfill chain on a real worker, under model B
        register_candidate(db, models["bench-b"], actor="bench")
        promote(db, "bench-b", actor="bench")
        runtime.reset()
        backfill.reset()
        configure(settings)
        with db.transaction():
            upsert_listings(db, [ListingEvent(listing_id="warm-up", seller_id="bench", images=[str(images[-1])])])
        with start_worker(app, pool="solo", perform_ping_check=False, queues=[gpu_q, bf_q], shutdown_timeout=30):
            send_enrich(["warm-up"], settings)  # the worker loads model B and runs one task
            while db.execute("SELECT status FROM listings WHERE listing_id = 'warm-up'").fetchone()[0] != "enriched":
                time.sleep(0.05)
            t0, c0 = time.perf_counter(), time.process_time()
            app.send_task("enrich.backfill", args=["bench-b"], kwargs={"reindex_queue": cpu_q}, queue=bf_q)
            while (db.execute("SELECT status FROM backfills WHERE model_version = 'bench-b'").fetchone()
                   or ("",))[0] != "done":
                time.sleep(0.02)
            chain_wall, chain_cpu = time.perf_counter() - t0, time.process_time() - c0
        n = db.execute("SELECT count(*) FROM embeddings WHERE model_version = 'bench-b'").fetchone()[0] - 1
        assert n == args.listings, n
        print(f"{f'backfill chain (Celery, {n} listings):':<46}{rate(n, chain_wall, chain_cpu)}")

        # 3. the same backfill inline, under model C
        register_candidate(db, models["bench-c"], actor="bench")
        promote(db, "bench-c", actor="bench")
        enricher = Enricher(load_predictor(models["bench-c"], device="cpu", mixed_precision=False), settings)
        enricher.forward([enricher.predictor.preprocess(Image.new("RGB", (8, 8)))] * 2)
        t0, c0 = time.perf_counter(), time.process_time()
        done = backfill.run_inline(db, enricher, settings)
        inline_wall, inline_cpu = time.perf_counter() - t0, time.process_time() - c0
        enricher.close()
        n_inline = args.listings + 1  # the warm-up listing too
        assert done is not None and done.status == "done", done
        print(f"{f'backfill inline (no broker, {n_inline} listings):':<46}{rate(n_inline, inline_wall, inline_cpu)}")

        live_rate = args.listings / live_wall
        print(f"ratio backfill chain / worker path: {n / chain_wall / live_rate:.2f} "
              f"(per CPU-second {(n / chain_cpu) / (args.listings / live_cpu):.2f}); "
              f"inline / worker path: {n_inline / inline_wall / live_rate:.2f}")
        db.close()
    finally:
        runtime.reset()
        backfill.reset()
        from kombu import Connection

        with Connection(args.broker) as conn:
            for q in (gpu_q, bf_q, cpu_q):
                try:
                    conn.default_channel.queue_delete(q)
                except Exception:
                    pass
        admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        admin.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
