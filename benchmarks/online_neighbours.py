"""Online neighbours per enrichment batch: the whole write (search, the batch's own rows, ranking the new
listings into their neighbours' shelves under locks) against the search alone, same batches.

    python benchmarks/online_neighbours.py                    # 100 000 × 256-d catalogue, 30 batches of 16

Creates a throwaway database (Postgres at ENRICH_TEST_PG_ADMIN_URL, default 127.0.0.1:5432), loads a
clustered synthetic catalogue, runs the nightly recompute once (the snapshot the online path searches),
then for each batch of new listings (near copies of catalogue vectors, as re-uploads and similar
items are) times `online_topk` (the search) and then `write_online_neighbours` (search + writes), and
prints the medians, their ratio and how many other shelves each batch joined. Drops the database.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.similar_nightly import ADMIN_URL, MODEL, load_db, make_vectors  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="catalogue listings (default: 100,000)")
    ap.add_argument("--dim", type=int, default=256, help="embedding dimension (default: 256)")
    ap.add_argument("--k", type=int, default=20, help="neighbours per listing (default: 20)")
    ap.add_argument("--batches", type=int, default=30, help="enrichment batches timed (default: 30)")
    ap.add_argument("--batch", type=int, default=16, help="new listings per batch (default: 16)")
    args = ap.parse_args()

    import psycopg

    from core.config import get_settings
    from migrations import apply_all
    from similar.nightly import recompute
    from similar.online import online_topk, write_online_neighbours

    settings = get_settings()

    work = Path(tempfile.mkdtemp(prefix="online-bench-"))
    name = f"enrich_bench_{uuid.uuid4().hex[:10]}"
    url = psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)
    admin = psycopg.connect(ADMIN_URL, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    search_s, write_s, joined = [], [], []
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            apply_all(conn)
            make_vectors(args.n, args.dim, work / "vectors.npy", max(10, args.n // 100))
            load_db(url, work / "vectors.npy")
            # a catalogue built long before the nightly run: else the online path's slack (transactions
            # still open at snapshot time) puts all of it in the exactly-searched delta
            conn.execute("UPDATE embeddings SET created_at = now() - interval '1 day'")
            t0 = time.perf_counter()
            recompute(conn, MODEL, settings=settings, k=args.k, root=work / "index")
            print(f"catalogue {args.n:,} × {args.dim}-d loaded, nightly recompute {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr)
            vecs = np.load(work / "vectors.npy", mmap_mode="r")
            rng = np.random.default_rng(1)
            for b in range(args.batches):
                ids = [f"N{b:04d}-{i:02d}" for i in range(args.batch)]
                near = vecs[rng.integers(0, args.n, args.batch)] + 0.05 * rng.normal(size=(args.batch, args.dim))
                near = (near / np.linalg.norm(near, axis=1, keepdims=True)).astype("<f4")
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany("INSERT INTO listings (listing_id, seller_id, event, content_hash, status)"
                                    " VALUES (%s, 's', '{}'::jsonb, 'h', 'enriched')", [(i,) for i in ids])
                    cur.executemany("INSERT INTO embeddings (listing_id, model_version, dim, vector)"
                                    " VALUES (%s, %s, %s, %s)", [(i, MODEL, args.dim, v.tobytes()) for i, v in zip(ids, near)])
                t0 = time.perf_counter()
                online_topk(conn, ids, MODEL, args.k, work / "index", settings=settings)
                t1 = time.perf_counter()
                since = conn.execute("SELECT clock_timestamp()").fetchone()[0]
                t2 = time.perf_counter()
                write_online_neighbours(conn, ids, MODEL, args.k, settings=settings, root=work / "index")
                t3 = time.perf_counter()
                search_s.append(t1 - t0)
                write_s.append(t3 - t2)
                joined.append(conn.execute(  # other listings' shelves this batch wrote (new or updated rows)
                    "SELECT count(*) FROM similar_items_online WHERE computed_at >= %s AND NOT listing_id = ANY(%s)",
                    (since, ids)).fetchone()[0])
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        shutil.rmtree(work, ignore_errors=True)
    search, write = float(np.median(search_s[1:])), float(np.median(write_s[1:]))  # first batch: warm-up
    figures = {"n": args.n, "dim": args.dim, "k": args.k, "batch": args.batch, "batches": args.batches,
               "search_ms": round(1000 * search, 1), "write_ms": round(1000 * write, 1),
               "ratio_write_over_search": round(write / search, 2),
               "other_shelves_joined_per_batch": float(np.median(joined))}
    print(json.dumps(figures))
    print(f"\nbatch of {args.batch} new listings, catalogue {args.n:,}, top-{args.k} (medians of {args.batches - 1}):\n"
          f"  search alone {figures['search_ms']} ms; search + own rows + joining {figures['other_shelves_joined_per_batch']:.0f}"
          f" other shelves {figures['write_ms']} ms; ratio {figures['ratio_write_over_search']}")


if __name__ == "__main__":
    main()
