"""How to store nightly neighbours: one row per listing with arrays (what `similar_items` is) against one row per
(listing, neighbour) — write time, size on disk and the online read of one shelf.

    nice -n 10 python benchmarks/similar_storage.py --n 1000000        # 1 M listings × top-20 (20 M neighbour rows)

A throwaway database (Postgres at ENRICH_TEST_PG_ADMIN_URL), n listings with random neighbours (ids and
scores; what is stored, not how it was found, is measured):
  arrays  `similar_items` (version, listing_id, neighbour_ids text[], scores real[]), written as the nightly
          job writes it (`similar.pgcopy.encode_neighbour_rows`, binary COPY, one transaction);
  rows    (version, listing_id, rank, neighbour_id, score) with the primary key (version, listing_id, rank),
          written by binary COPY of rows built in numpy the same way;
then each table's size (heap + TOAST + indexes) and the read of 2 000 random listings' shelves one at a time
(p50 and p99 of one query, as a product page would ask). Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get("ENRICH_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CHUNK = 16_384

ROWS_TABLE = """CREATE TABLE similar_items_rows (
    version bigint NOT NULL, listing_id text COLLATE "C" NOT NULL, rank smallint NOT NULL,
    neighbour_id text NOT NULL, score real NOT NULL, PRIMARY KEY (version, listing_id, rank))"""


def fake_results(n: int, k: int, rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    """m listings' neighbours: random positions among n, scores descending."""
    pos = rng.integers(0, n, size=(m, k))
    scores = np.sort(rng.uniform(0.5, 1.0, size=(m, k)).astype(np.float32), axis=1)[:, ::-1]
    return pos, np.ascontiguousarray(scores)


def write_arrays(conn, ids: np.ndarray, k: int, version: int) -> float:
    from similar import pgcopy

    fields = pgcopy.encode_id_fields(ids)
    rng = np.random.default_rng(1)
    n = len(ids)

    def chunks():
        for s in range(0, n, CHUNK):
            m = min(CHUNK, n - s)
            pos, scores = fake_results(n, k, rng, m)
            yield pgcopy.encode_neighbour_rows(version, np.arange(s, s + m), pos, scores, fields)

    t0 = time.perf_counter()
    with conn.transaction():
        pgcopy.copy_neighbours_in(conn, "similar_items", chunks())
    return time.perf_counter() - t0


def write_rows(conn, ids: np.ndarray, k: int, version: int) -> float:
    n, width = len(ids), ids.dtype.itemsize
    row = np.dtype([("nf", ">i2"), ("l1", ">i4"), ("version", ">i8"), ("l2", ">i4"), ("id", f"S{width}"),
                    ("l3", ">i4"), ("rank", ">i2"), ("l4", ">i4"), ("nid", f"S{width}"), ("l5", ">i4"),
                    ("score", ">f4")])
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur, cur.copy(
            "COPY similar_items_rows (version, listing_id, rank, neighbour_id, score)"
            " FROM STDIN (FORMAT binary)") as copy:
        copy.write(b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8)
        for s in range(0, n, CHUNK):
            m = min(CHUNK, n - s)
            pos, scores = fake_results(n, k, rng, m)
            out = np.empty(m * k, row)
            out["nf"], out["l1"], out["version"], out["l2"] = 5, 8, version, width
            out["id"] = np.repeat(ids[s:s + m], k)
            out["l3"], out["rank"], out["l4"], out["l5"] = 2, np.tile(np.arange(k), m), width, 4
            out["nid"], out["score"] = ids[pos.ravel()], scores.ravel()
            copy.write(out.tobytes())
        copy.write(b"\xff\xff")
    return time.perf_counter() - t0


def read_latency(conn, query: str, version: int, ids: np.ndarray, samples: int = 2000) -> dict:
    rng = np.random.default_rng(2)
    picks = [ids[i].decode() for i in rng.integers(0, len(ids), samples)]
    times = []
    for lid in picks:
        t0 = time.perf_counter()
        got = conn.execute(query, (version, lid)).fetchall()
        times.append(time.perf_counter() - t0)
        assert got, lid
    t = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(t, 50)), 3), "p99_ms": round(float(np.percentile(t, 99)), 3)}


def size_mib(conn, table: str) -> float:
    return conn.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchone()[0] / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="listings (default: 1,000,000)")
    ap.add_argument("--k", type=int, default=20, help="neighbours per listing (default: 20)")
    args = ap.parse_args()

    import psycopg
    from similar_nightly import listing_ids

    from migrations import apply_all
    from similar import store as sdb

    name = f"enrich_bench_{uuid.uuid4().hex[:10]}"
    url = psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)
    admin = psycopg.connect(ADMIN_URL, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            apply_all(conn)
            conn.execute("ALTER TABLE similar_items DROP CONSTRAINT similar_items_version_fkey")
            conn.execute(ROWS_TABLE)
            ids = listing_ids(args.n)
            version = sdb.create_version(conn, "bench", args.k, {}, None)
            arrays_s = write_arrays(conn, ids, args.k, version)
            rows_s = write_rows(conn, ids, args.k, version)
            conn.execute("VACUUM ANALYZE similar_items")
            conn.execute("VACUUM ANALYZE similar_items_rows")
            sizes = {"arrays": size_mib(conn, "similar_items"), "rows": size_mib(conn, "similar_items_rows")}
            reads = {
                "arrays": read_latency(conn, "SELECT neighbour_ids, scores FROM similar_items"
                                             " WHERE version = %s AND listing_id = %s", version, ids),
                "rows": read_latency(conn, "SELECT neighbour_id, score FROM similar_items_rows"
                                           " WHERE version = %s AND listing_id = %s ORDER BY rank", version, ids),
            }
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    figures = {"n": args.n, "k": args.k, "write_s": {"arrays": round(arrays_s, 1), "rows": round(rows_s, 1)},
               "size_mib": {k: round(v) for k, v in sizes.items()}, "read": reads,
               "load_avg_1m": round(os.getloadavg()[0], 1)}
    print(json.dumps(figures))
    print(f"\n{args.n:,} listings × top-{args.k}:\n"
          f"  arrays (one row per listing): write {arrays_s:.1f}s, {sizes['arrays']:.0f} MiB, "
          f"read p50 {reads['arrays']['p50_ms']} ms p99 {reads['arrays']['p99_ms']} ms\n"
          f"  rows (one per neighbour):     write {rows_s:.1f}s, {sizes['rows']:.0f} MiB, "
          f"read p50 {reads['rows']['p50_ms']} ms p99 {reads['rows']['p99_ms']} ms\n"
          f"  rows / arrays: write {rows_s / arrays_s:.1f}×, size {sizes['rows'] / sizes['arrays']:.1f}×; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
