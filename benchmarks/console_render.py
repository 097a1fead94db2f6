"""Server-side render time of the console's review page and listing page with a 10 000-item review queue.

    python benchmarks/console_render.py                       # 10 000 items, 300 timed requests per page
    python benchmarks/console_render.py --items 50000 --requests 500

A throwaway Postgres database gets N enriched listings (deepfashion taxonomy in the active model's manifest),
each with a seller tag, a predicted tag, one open review item (five category candidates), a stored
similar-items shelf of 12 and, for one in ten, a correction. The console runs as its own process (uvicorn, one
worker, the default pool of 4 connections); one signed-in reviewer sends requests over one keep-alive
loopback connection and the time from sending to the last byte is recorded (HTML only: no thumbnails, no
browser rendering). Printed: p50 / p99 of
  * GET /review           the full page: filters with counts, the counter, the leased item;
  * POST /review/{id}/take a correction (CorrectionEvent path) and the next item's HTML, leased;
  * GET /listings/{id}    a random listing: tags, shelf, history, review items.
"""
from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import statistics
import subprocess
import sys
import time
import uuid
from html import unescape as html_unescape
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECRET = "bench-console-secret-" + "x" * 32
PASSWORD = "bench-password-1"


def seed(conn, n: int, model: str) -> None:
    from psycopg.types.json import Jsonb

    from schemas.taxonomy import load_taxonomy

    tax = load_taxonomy("deepfashion")
    conn.execute("INSERT INTO models (model_version, manifest, path, status, promoted_at)"
                 " VALUES (%s, %s, '/nowhere', 'active', now())",
                 (model, Jsonb({"model_version": model, "taxonomy": tax.model_dump(mode="json")})))
    conn.execute(
        """INSERT INTO listings (listing_id, seller_id, event, content_hash, status, enriched_hash)
           SELECT 'B' || lpad(i::text, 7, '0'), 's' || (i %% 997),
                  jsonb_build_object('schema_version', 1, 'event_id', NULL, 'listing_id', 'B' || lpad(i::text, 7, '0'),
                                     'seller_id', 's' || (i %% 997), 'title', 'listing ' || i || ' floral cotton dress',
                                     'description', repeat('a soft summer dress ', 8), 'locale', 'en',
                                     'images', jsonb_build_array('/nonexistent/' || i || '-0.png',
                                                                 '/nonexistent/' || i || '-1.png'),
                                     'category', NULL, 'attributes', jsonb_build_object('fabric', 'cotton'),
                                     'deleted', false),
                  md5(i::text), 'enriched', md5(i::text)
             FROM generate_series(1, %s) i""", (n,))
    conn.execute("""INSERT INTO listing_tags (listing_id, tag_group, value, source, confidence, model_version)
                    SELECT listing_id, 'fabric', 'cotton', 'seller', NULL, NULL FROM listings
                    UNION ALL
                    SELECT listing_id, 'sleeve', 'short', 'predicted', 0.91, %s FROM listings""", (model,))
    names = tax.category_names
    rng = random.Random(0)
    with conn.cursor() as cur:
        rows = []
        for i in range(1, n + 1):
            picks = rng.sample(names, 5)
            confs = sorted((rng.random() for _ in range(5)), reverse=True)
            total = sum(confs) * 1.6
            candidates = [[p, round(c / total, 4)] for p, c in zip(picks, confs, strict=True)]
            rows.append((f"B{i:07d}", Jsonb(candidates), 0.6, model))
        cur.executemany("INSERT INTO review_queue (listing_id, tag_group, candidates, threshold, model_version)"
                        " VALUES (%s, 'category', %s, %s, %s)", rows)
        shelves = []
        for i in range(1, n + 1):
            nb = rng.sample(range(1, n + 1), 13)
            nb = [j for j in nb if j != i][:12]
            shelves.append((model, f"B{i:07d}", [f"B{j:07d}" for j in nb],
                            sorted((rng.random() for _ in nb), reverse=True)))
        cur.executemany("INSERT INTO similar_items_online (model_version, listing_id, neighbour_ids, scores)"
                        " VALUES (%s, %s, %s, %s::real[])", shelves)
        cur.executemany("INSERT INTO corrections (event_id, listing_id, tag_group, old_value, new_value,"
                        " corrected_by, corrected_at) VALUES (%s, %s, 'sleeve', 'short', 'long', 'ops', now())",
                        [(f"seed-{i}", f"B{i:07d}") for i in range(1, n + 1, 10)])
    conn.execute("ANALYZE")


class Client:
    """One keep-alive connection with the session cookie."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.cookie = ""
        self.csrf = ""

    def request(self, method: str, path: str, form: dict | None = None) -> tuple[int, str, float]:
        headers = {"Cookie": self.cookie} if self.cookie else {}
        body = None
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            headers["X-CSRF-Token"] = self.csrf
        t0 = time.perf_counter()
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        text = resp.read().decode()
        dt = time.perf_counter() - t0
        for value in resp.headers.get_all("set-cookie") or []:
            self.cookie = value.split(";", 1)[0]
        m = re.search(r'name="csrf-token" content="([^"]+)"', text)
        if m:
            self.csrf = m.group(1)
        return resp.status, text, dt


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] * 1000


def serve(args) -> None:
    import uvicorn

    from core.config import Settings
    from enrich.console.app import create_app

    settings = Settings(database_url=args.db, console_secret_key=SECRET, data_dir=Path(args.data_dir))
    uvicorn.run(create_app(settings), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=10_000, help="open review items (= listings), default 10 000")
    ap.add_argument("--requests", type=int, default=300, help="timed requests per page (default: 300)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed requests first (default: 20)")
    ap.add_argument("--pg-admin", default=os.environ.get("ENRICH_TEST_PG_ADMIN_URL",
                                                          "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--db", default="", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args)

    import psycopg

    from enrich.console.users import add_user
    from harness.net import free_port, wait_port
    from migrations import apply_all

    dbname = f"bench_console_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(args.pg_admin, autocommit=True)
    admin.execute(f'CREATE DATABASE "{dbname}"')
    url = psycopg.conninfo.make_conninfo(args.pg_admin, dbname=dbname)
    server = None
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            apply_all(conn)
            t0 = time.perf_counter()
            seed(conn, args.items, "bench-m1")
            add_user(conn, "bench", PASSWORD, "reviewer")
            seeded = time.perf_counter() - t0
        port = free_port()
        data_dir = Path("/tmp") / dbname
        server = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(port), "--db", url,
                                   "--data-dir", str(data_dir)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wait_port("127.0.0.1", port, timeout=60)
        c = Client(port)
        c.request("GET", "/login")
        status, _, _ = c.request("POST", "/login", {"name": "bench", "password": PASSWORD, "csrf": c.csrf})
        assert status == 303, status
        c.request("GET", "/review")

        review, take, listing = [], [], []
        rng = random.Random(1)
        for i in range(args.warmup + args.requests):
            status, html, dt = c.request("GET", "/review")
            assert status == 200 and 'data-item="' in html
            item = re.search(r'id="rv-current" data-item="(\d+)"', html).group(1)
            value = re.search(r'class="plain rv-cand" data-key="1" data-value="([^"]+)"', html).group(1)
            status, html, dt2 = c.request("POST", f"/review/{item}/take", {"value": html_unescape(value)})
            assert status == 200 and "Saved category" in html, html[:400]
            status, html, dt3 = c.request("GET", f"/listings/B{rng.randint(1, args.items):07d}")
            assert status == 200 and "Correction history" in html
            if i >= args.warmup:
                review.append(dt)
                take.append(dt2)
                listing.append(dt3)
        cmd = "python benchmarks/console_render.py" + "".join(
            f" --{k} {v}" for k, v in (("items", args.items), ("requests", args.requests)) if v != ap.get_default(k))
        print(f"$ {cmd}")
        print(f"{args.items} open review items (seeded in {seeded:.1f}s); {args.requests} timed requests each, "
              f"one reviewer, keep-alive loopback, HTML only")
        for name, xs in (("GET /review (full page)", review), ("POST /review/{id}/take + next item", take),
                         ("GET /listings/{id}", listing)):
            print(f"  {name:36s} p50 {pct(xs, 0.5):6.1f} ms   p99 {pct(xs, 0.99):6.1f} ms   "
                  f"mean {statistics.fmean(xs) * 1000:6.1f} ms")
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        admin.close()


if __name__ == "__main__":
    main()
