"""How long a running worker takes to serve a newly promoted model, and how much its batches slow meanwhile.

    python benchmarks/model_switch.py                            # lite0 at 224 px, ENRICH_MODEL_CHECK_S=10
    python benchmarks/model_switch.py --backbone small_cnn --image-size 32 --check-s 2

A real `enrich worker` process (RabbitMQ broker, a throwaway Postgres database) serves model A from the
registry; a steady stream of one-listing tasks runs through it. Then model B is registered and
promoted. Printed: seconds from the promotion's commit to the first task served by B (the registry
check interval plus fetching, verifying and loading B in the background), and the median task time
before the promotion against the median while B loads (the background load competes for the CPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pipeline_throughput import make_images  # noqa: E402

AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def make_model(out: Path, version: str, backbone: str, image_size: int, seed: int) -> Path:
    import torch

    from model.checkpoint import save_model
    from model.network import build_model
    from schemas.taxonomy import load_taxonomy

    torch.manual_seed(seed)
    model = build_model(backbone, load_taxonomy("fashion-mnist"), pretrained=backbone != "small_cnn")
    save_model(model, out, model_version=version, image_size=image_size, metrics={"test/top1": 0.1 * (seed + 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="efficientnet_lite0", help="backbone (default: efficientnet_lite0)")
    ap.add_argument("--image-size", type=int, default=224, help="input size (default: 224)")
    ap.add_argument("--check-s", type=float, default=10.0, help="ENRICH_MODEL_CHECK_S (default: 10)")
    ap.add_argument("--before", type=int, default=10, help="tasks timed before the promotion (default: 10)")
    ap.add_argument("--pg-admin", default=os.environ.get("ENRICH_TEST_PG_ADMIN_URL",
                                                          "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--fmnist-dir", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()

    import psycopg

    from core.celery_app import configure, send_enrich
    from core.config import Settings
    from migrations import apply_all
    from model.artifacts import store_from_settings
    from model.registry import promote, register_candidate
    from schemas.events import ListingEvent
    from worker.store import upsert_listings

    work = Path(tempfile.mkdtemp(prefix="bench-switch-"))
    dbname = f"bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(args.pg_admin, autocommit=True)
    admin.execute(f'CREATE DATABASE "{dbname}"')
    pg_url = psycopg.conninfo.make_conninfo(args.pg_admin, dbname=dbname)
    queue = f"gpu-switch-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "ENRICH_DATABASE_URL": pg_url, "ENRICH_DATA_DIR": str(work / "data"),
           "ENRICH_CELERY_BROKER_URL": AMQP, "ENRICH_GPU_QUEUE": queue, "ENRICH_ALLOW_LOCAL_PATHS": "true",
           "ENRICH_MODEL_CHECK_S": str(args.check_s), "ENRICH_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("ENRICH_MODEL_DIR", None)
    settings = Settings(database_url=pg_url, data_dir=work / "data", celery_broker_url=AMQP, gpu_queue=queue)
    worker = None
    conn = psycopg.connect(pg_url, autocommit=True)
    try:
        apply_all(conn)
        store = store_from_settings(settings)
        for version, seed in (("switch-a", 0), ("switch-b", 1)):
            register_candidate(conn, make_model(work / version, version, args.backbone, args.image_size, seed), store,
                               actor="bench", reason="model switch benchmark")
        promote(conn, "switch-a", actor="bench", reason="start")
        image = make_images(work / "images", 1, 256, Path(args.fmnist_dir))[0]
        configure(settings)
        worker = subprocess.Popen([sys.executable, "-m", "enrich.cli", "worker", "--loglevel=WARNING"], env=env,
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(work / "worker.log", "w"))
        n = 0

        def one_task(timeout: float = 300.0) -> tuple[float, str]:
            nonlocal n
            lid = f"l{n}"
            n += 1
            with conn.transaction():
                upsert_listings(conn, [ListingEvent(listing_id=lid, seller_id="s", images=[str(image)])])
            t0 = time.perf_counter()
            send_enrich([lid], settings)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                row = conn.execute("SELECT model_version FROM embeddings WHERE listing_id = %s", (lid,)).fetchone()
                if row:
                    return time.perf_counter() - t0, row[0]
                time.sleep(0.01)
            raise RuntimeError(f"task not done in {timeout}s; see {work / 'worker.log'}")

        one_task()  # the worker starts and loads A
        before = [one_task()[0] for _ in range(args.before)]
        promote(conn, "switch-b", actor="bench", reason="switch")
        promoted_at = time.perf_counter()
        during = []
        while True:
            seconds, version = one_task()
            if version == "switch-b":
                break
            during.append(seconds)
        served_after = time.perf_counter() - promoted_at
        print(f"{args.backbone} at {args.image_size}px, ENRICH_MODEL_CHECK_S={args.check_s:g}: "
              f"promoted → first task served by the new model in {served_after:.1f}s; "
              f"task time {statistics.median(before) * 1000:.0f} ms before, "
              f"{statistics.median(during) * 1000 if during else float('nan'):.0f} ms while it loaded "
              f"({len(during)} tasks)")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        conn.close()
        admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        admin.close()


if __name__ == "__main__":
    main()
