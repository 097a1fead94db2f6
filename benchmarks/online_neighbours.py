"""Online neighbours per enrichment batch: the whole write (search, the batch's own rows, ranking the new
listings into their neighbours' shelves under locks) against the search alone, same batches; and with
--growth, what a task's delta step costs as the listings written since the snapshot grow.

    python benchmarks/online_neighbours.py                    # 100 000 × 256-d catalogue, 30 batches of 16
    python benchmarks/online_neighbours.py --growth 0,25000,50000,100000

Creates a throwaway database (Postgres at ENRICH_TEST_PG_ADMIN_URL, default 127.0.0.1:5432), loads a
clustered synthetic catalogue, runs the nightly recompute once (the snapshot the online path searches),
then for each batch of new listings (near copies of catalogue vectors, as re-uploads and similar
items are) times `online_topk` (the search) and then `write_online_neighbours` (search + writes), and
prints the medians, their ratio and how many other shelves each batch joined. Drops the database.

--growth: at each number of listings written since the snapshot (filled in by plain inserts), `--batches`
batches are timed twice: the delta step of this code (top up the process's delta with the rows written since
the last task, search it: exactly beside a Flat snapshot, in the snapshot's IVF lists beside an IVF one)
against the re-read of every embedding since the snapshot that the online path did per task before (read
it from Postgres, exact search over it); with the rows each reads, and the recall@k of the whole online answer
(snapshot + delta) of one batch against exact search of everything.
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
    ap.add_argument("--growth", default=None,
                    help="comma-separated listings written since the snapshot at which to time the delta step "
                         "against a re-read of the whole delta (e.g. 0,25000,50000,100000)")
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
            t0 = time.perf_counter()
            recompute(conn, MODEL, settings=settings, k=args.k, root=work / "index")
            print(f"catalogue {args.n:,} × {args.dim}-d loaded, nightly recompute {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr)
            vecs = np.load(work / "vectors.npy", mmap_mode="r")
            rng = np.random.default_rng(1)
            if args.growth:
                growth(conn, args, vecs, rng, work / "index", settings)
                return
            for b in range(args.batches):
                ids = add_near(conn, f"N{b:04d}", vecs, rng, args.batch)
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
          f"  search alone {figures['search_ms']} ms; search + own rows + joining "
          f"{figures['other_shelves_joined_per_batch']:.0f} other shelves {figures['write_ms']} ms; "
          f"ratio {figures['ratio_write_over_search']}")


def add_near(conn, prefix: str, vecs: np.ndarray, rng, n: int) -> list[str]:
    """n new listings near random catalogue vectors, committed (as a worker's write is)."""
    ids = [f"{prefix}-{i:05d}" for i in range(n)]
    near = vecs[rng.integers(0, len(vecs), n)] + 0.05 * rng.normal(size=(n, vecs.shape[1]))
    near = (near / np.linalg.norm(near, axis=1, keepdims=True)).astype("<f4")
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy("COPY listings (listing_id, seller_id, event, content_hash, status) FROM STDIN") as cp:
            for i in ids:
                cp.write_row((i, "s", "{}", "h", "enriched"))
        with cur.copy("COPY embeddings (listing_id, model_version, dim, vector) FROM STDIN") as cp:
            for i, v in zip(ids, near, strict=True):
                cp.write_row((i, MODEL, len(v), v.tobytes()))
    return ids


def growth(conn, args, vecs, rng, root: Path, settings) -> None:
    """The delta step per task (this code: top up, search) against the per-task re-read of the whole delta."""
    from prometheus_client import REGISTRY

    from similar import delta as dl
    from similar import index as ix
    from similar import store as sdb
    from similar.common import decode_ids
    from similar.online import cached_snapshot, online_topk

    snap = cached_snapshot(MODEL, root, settings=settings)
    rows = lambda: REGISTRY.get_sample_value("enrich_online_rows_read_total") or 0.0  # noqa: E731
    since, table = 0, []
    for target in sorted(int(x) for x in args.growth.split(",")):
        while since < target:  # listings other tasks wrote since the snapshot
            step = min(20_000, target - since)
            add_near(conn, f"F{since:07d}", vecs, rng, step)
            since += step
        new_ms, old_ms, new_rows, old_rows, recall = [], [], [], [], []
        for b in range(args.batches):
            ids = add_near(conn, f"G{target:07d}-{b:03d}", vecs, rng, args.batch)
            since += args.batch
            queries = sdb.read_embeddings(conn, MODEL, only_ids=ids)
            r0, t0 = rows(), time.perf_counter()
            delta = dl.current_delta(conn, MODEL, snap, settings=settings)
            delta.search(queries.vectors, 2 * args.k + 1)
            t1 = time.perf_counter()
            reread = sdb.read_embeddings(conn, MODEL, not_visible_in=snap.manifest.read_snapshot)
            ix.exact_topk(queries.vectors, reread.vectors, 2 * args.k + 1)
            t2 = time.perf_counter()
            if b:  # the first batch after a fill also reads the fill: a warm-up
                new_ms.append(1000 * (t1 - t0))
                old_ms.append(1000 * (t2 - t1))
                new_rows.append(rows() - r0)
                old_rows.append(len(reread))
        # the whole online answer (snapshot + delta) of the last batch against exact search of everything
        found = online_topk(conn, ids, MODEL, args.k, root, settings=settings)
        everything = sdb.read_embeddings(conn, MODEL)
        _, exact = ix.exact_topk(queries.vectors, everything.vectors, args.k + 1)
        for qid, truth in zip(decode_ids(queries.ids), exact, strict=True):
            want = [everything.ids[p].decode() for p in truth if p >= 0 and everything.ids[p].decode() != qid][:args.k]
            recall.append(len(set(want) & {n.listing_id for n in found[qid]}) / len(want))
        new, old = float(np.median(new_ms)), float(np.median(old_ms))
        table.append({"since_snapshot": target, "delta_ms": round(new, 2), "reread_ms": round(old, 2),
                      "ratio_reread_over_delta": round(old / new, 1), "rows_read_delta": float(np.median(new_rows)),
                      "rows_read_reread": float(np.median(old_rows)),
                      "delta_mib": round(dl.held(MODEL) * args.dim * 4 / 2**20, 1),
                      "recall_at_k": round(float(np.mean(recall)), 3), "exact": delta.exact})
    print(json.dumps(table))
    print(f"\ndelta step per task of {args.batch} (medians of {args.batches - 1}), {args.dim}-d, catalogue {args.n:,}:")
    print(f"{'since snapshot':>15} {'this code ms':>13} {'re-read ms':>11} {'ratio':>6} {'rows read':>10} "
          f"{'re-read rows':>13} {'delta MiB':>10} {'recall@k':>9}")
    for r in table:
        print(f"{r['since_snapshot']:>15,} {r['delta_ms']:>13} {r['reread_ms']:>11} {r['ratio_reread_over_delta']:>6} "
              f"{r['rows_read_delta']:>10.0f} {r['rows_read_reread']:>13.0f} {r['delta_mib']:>10} "
              f"{r['recall_at_k']:>9}")


if __name__ == "__main__":
    main()
