"""Nightly similar-items recompute: end to end against a bare faiss run of the same index, same vectors.

    nice -n 10 python benchmarks/similar_nightly.py --n 1000000          # 1 M × 256-d, top-20
    nice -n 10 python benchmarks/similar_nightly.py --n 100000 --queries 500
    nice -n 10 python benchmarks/similar_nightly.py --n 10000000 --source model --model-dir DIR \
        --no-baselines --workdir /tmp/n10m --keep-db    # the quickstart model's vectors, jittered to 10 M
    ENRICH_S3_ENDPOINT_URL=http://127.0.0.1:9000 python benchmarks/similar_nightly.py --n 1000000 \
        --index-uri s3://enrich-index/bench     # also publish to S3 and time a worker downloading it

What it does (all on this machine, Postgres at ENRICH_TEST_PG_ADMIN_URL, default 127.0.0.1:5432):
  1. creates a throwaway database, migrates it, writes n listings with unit vectors (binary COPY; not
     timed) and VACUUM ANALYZEs it, as a nightly job would find it. The vectors: `--source clusters`,
     Gaussian blobs around random centres (well separated: any index finds them); `--source model`,
     what the worker stores for FMNIST-shop photos (`embed_shop_photos`: a trained model's shelf vectors
     of 70 000 garments × 2 photos) jittered to n (`jitter_vectors`). `--keep-db` keeps the database
     and `--reuse-db NAME` measures one kept earlier (the vectors stay in --workdir);
  2. bare faiss (child process): the same vectors from a .npy file, the same index spec → train,
     add, search every vector's top-(k+1). No Postgres. Time and peak RSS (`--no-baselines` skips it
     and the next: at 10 M their float32 copies alone need 10 GB);
  3. end to end (child process): `similar.nightly.recompute` — read from Postgres (binary COPY),
     build, snapshot, search all, binary-COPY the new version, switch. Time and peak RSS;
  3b. with --index-uri: the run also publishes its snapshot to S3, and a child playing a worker on
     another machine downloads it (pull_latest) and maps it; times against writing and mapping it locally;
  4. recall@k of what was stored against exact search over the same vectors, on a sample of queries;
     the sizes on disk of the embeddings, the stored neighbours and the snapshot;
  5. drops the database (unless kept). Prints one JSON line of figures and a short table.
Each phase runs in its own process so peak RSS is its own, not the data generator's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get("ENRICH_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
MODEL = "bench"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """CPU seconds of this process so far, all threads (Postgres's own processes not included)."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def make_vectors(n: int, dim: int, path: Path, clusters: int, seed: int = 0, chunk: int = 100_000) -> None:
    """Clustered unit vectors (Gaussian blobs around random centres) written to a .npy, chunk by chunk."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype="<f4", shape=(n, dim))
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centres[rng.integers(0, clusters, m)] + 0.6 * rng.normal(size=(m, dim)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out


def embed_shop_photos(model_dir: Path, data_dir: Path, photos_per_item: int = 2, batch: int = 1024) -> np.ndarray:
    """The model's shelf vectors (what the worker stores) of FMNIST-shop photos of all 70 000 Fashion-MNIST
    garments, `photos_per_item` photos each (the first plain, the others shifted, rotated, lit differently)."""
    import torch
    import torch.nn.functional as F

    from model.inference import load_predictor, shelf_embedding
    from training.fmnist import load_fashion_mnist
    from training.fmnist_shop import build_shop

    predictor = load_predictor(model_dir, device="cpu")
    man = predictor.manifest
    xs, ys = zip(*(load_fashion_mnist(data_dir, split) for split in ("train", "test")), strict=True)
    shop = build_shop(np.concatenate(xs), np.concatenate(ys), predictor.taxonomy, photos_per_item=photos_per_item,
                      seed=11)
    mean = torch.tensor(man.normalisation.mean).view(1, 3, 1, 1)
    std = torch.tensor(man.normalisation.std).view(1, 3, 1, 1)
    out = []
    for s in range(0, len(shop.images), batch):
        x = torch.from_numpy(shop.images[s:s + batch]).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != man.image_size:
            x = F.interpolate(x, size=(man.image_size, man.image_size), mode="bilinear", antialias=True)
        pred = predictor.predict((x - mean) / std)
        out.append(shelf_embedding(pred.embedding, pred.category.argmax(1), pred.category.shape[1],
                                   predictor.model.shelf_category_weight))
    return np.concatenate(out).astype(np.float32)


def jitter_vectors(base: np.ndarray, n: int, path: Path, seed: int = 0, chunk: int = 200_000) -> float:
    """n unit vectors between the model's: each lies on the segment from a random base vector a towards one
    of a's 10 nearest base vectors b, at t ~ U(0, ½), plus isotropic noise of ¼ the median distance between
    nearest base vectors; written to a .npy chunk by chunk. Like more photos of the same garments: the
    whole keeps the model's clusters, hubs and empty regions, and no point has dozens of copies at equal
    distance (isotropic jitter alone would make the exact top-20 a coin toss among them). Returns σ."""
    import faiss

    rng = np.random.default_rng(seed)
    base = np.ascontiguousarray(base, dtype=np.float32)
    d = base.shape[1]
    _, near = faiss.knn(base, base, 11, metric=faiss.METRIC_INNER_PRODUCT)
    near = near[:, 1:]  # not itself
    nn_dist = np.sqrt(np.maximum(0.0, 2 - 2 * np.einsum("bd,bd->b", base, base[near[:, 0]])))
    sigma = float(0.25 * np.median(nn_dist) / np.sqrt(d))
    out = np.lib.format.open_memmap(path, mode="w+", dtype="<f4", shape=(n, d))
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        a = rng.integers(0, len(base), m)
        b = near[a, rng.integers(0, near.shape[1], m)]
        t = rng.uniform(0, 0.5, (m, 1)).astype(np.float32)
        x = (1 - t) * base[a] + t * base[b] + rng.normal(scale=sigma, size=(m, d)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    return sigma


def listing_ids(n: int) -> np.ndarray:
    return np.char.add(b"L", np.char.zfill(np.arange(n).astype("S7"), 7)).astype("S8")


def load_db(url: str, vec_path: Path, chunk: int = 50_000) -> None:
    """Listings via generate_series, embeddings via binary COPY of fixed-size rows built in numpy."""
    import psycopg

    vecs = np.load(vec_path, mmap_mode="r")
    n, dim = vecs.shape
    ids = listing_ids(n)
    mv = MODEL.encode()
    row = np.dtype([("nf", ">i2"), ("l1", ">i4"), ("id", "S8"), ("l2", ">i4"), ("mv", f"S{len(mv)}"),
                    ("l3", ">i4"), ("dim", ">i4"), ("l4", ">i4"), ("vec", "<f4", (dim,))])
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash, status)"
                     " SELECT 'L' || lpad(g::text, 7, '0'), 's', '{}'::jsonb, 'h', 'enriched'"
                     " FROM generate_series(0, %s - 1) g", (n,))
        with conn.cursor() as cur, cur.copy(
            "COPY embeddings (listing_id, model_version, dim, vector) FROM STDIN (FORMAT binary)"
        ) as copy:
            copy.write(b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8)
            for s in range(0, n, chunk):
                m = min(chunk, n - s)
                rows = np.empty(m, row)
                rows["nf"], rows["l1"], rows["id"] = 4, 8, ids[s:s + m]
                rows["l2"], rows["mv"], rows["l3"], rows["dim"] = len(mv), mv, 4, dim
                rows["l4"], rows["vec"] = 4 * dim, vecs[s:s + m]
                copy.write(rows.tobytes())
            copy.write(b"\xff\xff")
        conn.execute("VACUUM (ANALYZE) listings")
        conn.execute("VACUUM (ANALYZE) embeddings")
        conn.execute("CHECKPOINT")


# --- child processes ------------------------------------------------------------------------------

def child_bare(vec_path: str, k: int, factory: str | None, nprobe: int | None) -> dict:
    """Plain faiss API: index_factory → train (same sample, same k-means settings) → add → search."""
    import faiss

    from similar import index as ix

    vecs = np.load(vec_path)  # into memory before the clock starts, like the e2e run after its read
    n, d = vecs.shape
    spec = ix.choose_spec(n, factory=factory, nprobe=nprobe)
    t0, c0 = time.perf_counter(), cpu_s()
    index = faiss.index_factory(d, spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.niter, ivf.cp.seed = ix.KMEANS_ITERATIONS, 1234
        budget = ix.TRAIN_POINTS_PER_LIST * ivf.nlist
        rows = np.sort(np.random.default_rng(1234).choice(n, size=min(budget, n), replace=False))
        index.train(vecs[rows])
    index.add(vecs)
    ix.apply_search_params(index, spec)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(0, n, ix.SEARCH_BATCH):
        index.search(vecs[s:s + ix.SEARCH_BATCH], k + 1)
    t_search = time.perf_counter() - t0
    return {"factory": spec.factory, "nprobe": spec.nprobe, "build_s": t_build, "search_s": t_search,
            "total_s": t_build + t_search, "cpu_s": cpu_s() - c0, "peak_rss_mib": peak_rss_mib()}


def child_algo(vec_path: str, k: int, factory: str | None, nprobe: int | None) -> dict:
    """The e2e run's own index code (one assignment pass, queries in list order) without Postgres."""
    from similar import index as ix

    vecs = np.load(vec_path)
    spec = ix.choose_spec(len(vecs), factory=factory, nprobe=nprobe)
    t0 = time.perf_counter()
    index, assignment = ix.build_index(vecs, spec, keep_assignment=True)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = ix.search_grouped(index, k + 1) if spec.grouped else ix.search_all(index, vecs, k + 1, assignment)
    for _ in batches:
        pass
    t_search = time.perf_counter() - t0
    return {"factory": spec.factory, "build_s": t_build, "search_s": t_search,
            "total_s": t_build + t_search, "peak_rss_mib": peak_rss_mib()}


def dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def child_e2e(url: str, root: str, k: int, factory: str | None, nprobe: int | None) -> dict:
    import logging

    import psycopg

    from core.config import get_settings
    from similar.nightly import recompute

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    conn = psycopg.connect(url, autocommit=True)
    t0, c0 = time.perf_counter(), cpu_s()
    result = recompute(conn, MODEL, settings=get_settings(), k=k, factory=factory, nprobe=nprobe, root=root,
                       progress=False)
    total, cpu = time.perf_counter() - t0, cpu_s() - c0
    conn.close()
    return {"factory": result.factory, "total_s": total, "cpu_s": cpu, "phases_s": result.timings_s,
            "snapshot": result.snapshot, "snapshot_mib": dir_mib(Path(result.snapshot)), "count": result.count,
            "version": result.version, "peak_rss_mib": peak_rss_mib()}


def child_pull(root: str, nightly_snapshot: str) -> dict:
    """A worker on another machine: download the published snapshot and map it, vs. mapping the local one."""
    from core.config import get_settings
    from similar.snapshots import load_snapshot, store_from_settings

    t0 = time.perf_counter()
    load_snapshot(Path(nightly_snapshot), MODEL, mmap=True)
    local_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = store_from_settings(get_settings()).pull_latest(Path(root), MODEL)
    pull_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_snapshot(path, MODEL, mmap=True)
    mib = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    return {"pull_s": pull_s, "load_s": time.perf_counter() - t0, "local_load_s": local_s, "mib": mib}


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {args[0]} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- recall -------------------------------------------------------------------------------------

def recall_at_k(url: str, vec_path: Path, k: int, queries: int, seed: int = 7) -> float:
    import psycopg

    vecs = np.load(vec_path, mmap_mode="r")
    n = len(vecs)
    ids = listing_ids(n)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))
    q = np.asarray(vecs[sample])
    best_s = np.full((len(q), k + 1), -np.inf, np.float32)
    best_i = np.zeros((len(q), k + 1), np.int64)
    for s in range(0, n, 200_000):  # exact top-(k+1) over the same vectors, in chunks
        sims = q @ np.asarray(vecs[s:s + 200_000]).T
        cat_s = np.concatenate([best_s, sims], axis=1)
        cat_i = np.concatenate([best_i, np.arange(s, s + sims.shape[1])[None, :].repeat(len(q), 0)], axis=1)
        top = np.argpartition(-cat_s, k, axis=1)[:, :k + 1]
        best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
    with psycopg.connect(url) as conn:
        stored = dict(conn.execute(
            "SELECT s.listing_id, s.neighbour_ids FROM similar_items_current s"
            " WHERE s.model_version = %s AND s.listing_id = ANY(%s)",
            (MODEL, [ids[i].decode() for i in sample])).fetchall())
    hits = 0
    order = np.argsort(-best_s, axis=1)
    for row, i in enumerate(sample):
        exact = [j for j in best_i[row][order[row]] if j != i][:k]
        hits += len({ids[j].decode() for j in exact} & set(stored[ids[i].decode()][:k]))
    return hits / (len(sample) * k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="listings (default: 1,000,000)")
    ap.add_argument("--dim", type=int, default=256, help="embedding dimension (default: 256)")
    ap.add_argument("--k", type=int, default=20, help="neighbours per listing (default: 20)")
    ap.add_argument("--factory", default=None, help="faiss factory string (default: chosen by size)")
    ap.add_argument("--nprobe", type=int, default=None, help="IVF nprobe (default: similar.index default)")
    ap.add_argument("--clusters", type=int, default=None, help="synthetic clusters (default: n // 100)")
    ap.add_argument("--queries", type=int, default=1000, help="queries for recall (default: 1000)")
    ap.add_argument("--workdir", type=Path, default=None, help="vectors + snapshots (default: a temp dir)")
    ap.add_argument("--source", choices=["clusters", "model"], default="clusters",
                    help="clusters: synthetic blobs; model: a model's shelf vectors of FMNIST-shop photos, jittered")
    ap.add_argument("--model-dir", type=Path, default=None, help="with --source model: a saved model directory")
    ap.add_argument("--fmnist-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                    help="with --source model: Fashion-MNIST idx files")
    ap.add_argument("--no-baselines", action="store_true", help="skip the bare faiss and no-Postgres children")
    ap.add_argument("--keep-db", action="store_true", help="keep the database (its name is printed)")
    ap.add_argument("--reuse-db", default=None, help="measure a database kept earlier (vectors in --workdir)")
    ap.add_argument("--prepare-only", action="store_true", help="create and load the database, keep it, stop")
    ap.add_argument("--index-uri", default=None,
                    help="s3://bucket/prefix: also publish the snapshot (ENRICH_INDEX_URI; endpoint from "
                         "ENRICH_S3_ENDPOINT_URL) and time a worker downloading it (default: local only)")
    args = ap.parse_args()
    if args.index_uri:
        os.environ["ENRICH_INDEX_URI"] = args.index_uri  # the children read it

    import psycopg

    from migrations import apply_all

    work = Path(args.workdir or tempfile.mkdtemp(prefix="similar-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    vec_path = work / "vectors.npy"
    name = args.reuse_db or f"enrich_bench_{uuid.uuid4().hex[:10]}"
    url = psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)
    admin = psycopg.connect(ADMIN_URL, autocommit=True)
    bare = algo = None
    try:
        if args.reuse_db is None:
            admin.execute(f'CREATE DATABASE "{name}"')
            with psycopg.connect(url) as conn:
                apply_all(conn)
            t0 = time.perf_counter()
            if args.source == "model":
                base = embed_shop_photos(args.model_dir, args.fmnist_dir)
                sigma = jitter_vectors(base, args.n, vec_path)
                print(f"{len(base)} model vectors of {base.shape[1]} dims jittered to {args.n} (σ {sigma:.4f})",
                      file=sys.stderr)
            else:
                make_vectors(args.n, args.dim, vec_path, args.clusters or max(10, args.n // 100))
            load_db(url, vec_path)
            print(f"setup (generate + load + vacuum) {time.perf_counter() - t0:.0f}s; database {name}",
                  file=sys.stderr)
            if args.prepare_only:
                args.keep_db = True
                return
        args.dim = np.load(vec_path, mmap_mode="r").shape[1]
        extra = [str(args.k), args.factory or "", str(args.nprobe or 0)]
        if not args.no_baselines:
            bare = run_child("_bare", str(vec_path), *extra)
            print(f"bare faiss: {bare}", file=sys.stderr)
            algo = run_child("_algo", str(vec_path), *extra)
            print(f"same index code, no Postgres: {algo}", file=sys.stderr)
        e2e = run_child("_e2e", url, str(work / "index"), *extra)
        print(f"end to end: {e2e}", file=sys.stderr)
        pull = run_child("_pull", str(work / "worker-index"), e2e["snapshot"]) if args.index_uri else None
        recall = recall_at_k(url, vec_path, args.k, args.queries)
        with psycopg.connect(url) as conn:
            disk = {t: round(conn.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0] / 2**20)
                    for t in ("embeddings", "listings", "similar_items")}
        disk["snapshot"] = round(e2e["snapshot_mib"])
    finally:
        if not args.keep_db:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    figures = {"n": args.n, "dim": args.dim, "k": args.k, "source": args.source, "factory": e2e["factory"],
               "e2e_s": round(e2e["total_s"], 1), "recall_at_k": round(recall, 4),
               "e2e_phases_s": {k: round(v, 1) for k, v in e2e["phases_s"].items()},
               "e2e_peak_rss_mib": round(e2e["peak_rss_mib"]), "e2e_cpu_s": round(e2e["cpu_s"], 1),
               "disk_mib": disk, "load_avg_1m": round(os.getloadavg()[0], 1), "cpus": os.cpu_count()}
    if bare is not None:
        figures.update({"nprobe": bare["nprobe"], "bare_faiss_s": round(bare["total_s"], 1),
                        "ratio_e2e_over_bare": round(e2e["total_s"] / bare["total_s"], 3),
                        "no_pg_s": round(algo["total_s"], 1),
                        "ratio_e2e_over_no_pg": round(e2e["total_s"] / algo["total_s"], 3),
                        "bare_phases_s": {"build": round(bare["build_s"], 1), "search": round(bare["search_s"], 1)},
                        "bare_peak_rss_mib": round(bare["peak_rss_mib"]), "bare_cpu_s": round(bare["cpu_s"], 1)})
    print(json.dumps(figures))
    print(f"\n{args.n:,} × {args.dim}-d ({args.source}), top-{args.k}, {e2e['factory']}: end to end "
          f"{e2e['total_s']:.1f}s (phases {figures['e2e_phases_s']}), recall@{args.k} {recall:.4f}, peak RSS "
          f"{e2e['peak_rss_mib']:.0f} MiB; on disk (MiB) {disk}; load average {os.getloadavg()[0]:.1f}")
    if bare is None:
        return
    print(f"  {args.n:,} × {args.dim}-d, top-{args.k}, {e2e['factory']} nprobe {bare['nprobe']}:\n"
          f"  end to end {e2e['total_s']:.1f}s  (phases {figures['e2e_phases_s']})\n"
          f"  bare faiss {bare['total_s']:.1f}s  (build {bare['build_s']:.1f}s, search {bare['search_s']:.1f}s)\n"
          f"  same index code without Postgres {algo['total_s']:.1f}s  (build {algo['build_s']:.1f}s, "
          f"search {algo['search_s']:.1f}s); e2e / that {figures['ratio_e2e_over_no_pg']}\n"
          f"  ratio {figures['ratio_e2e_over_bare']}   recall@{args.k} {recall:.4f}\n"
          f"  peak RSS end to end {e2e['peak_rss_mib']:.0f} MiB, bare {bare['peak_rss_mib']:.0f} MiB\n"
          f"  CPU s of the process end to end {e2e['cpu_s']:.1f} (Postgres's not counted), bare {bare['cpu_s']:.1f}; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work skews wall times)")
    if pull:
        write_s = e2e["phases_s"]["snapshot"]
        print(f"  snapshot {pull['mib']:.0f} MiB: written locally {write_s:.1f}s, published "
              f"{e2e['phases_s']['publish']:.1f}s ({e2e['phases_s']['publish'] / write_s:.1f}× the local write); "
              f"a worker elsewhere downloads it in {pull['pull_s']:.1f}s and maps it in {pull['load_s']:.2f}s "
              f"(the local copy: {pull['local_load_s']:.2f}s)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_pull":
        print(json.dumps(child_pull(*sys.argv[2:])))
    elif len(sys.argv) > 1 and sys.argv[1] in ("_bare", "_algo", "_e2e"):
        mode, *rest = sys.argv[1:]
        k, factory, nprobe = int(rest[-3]), rest[-2] or None, int(rest[-1]) or None
        if mode == "_e2e":
            out = child_e2e(rest[0], rest[1], k, factory, nprobe)
        else:
            out = (child_bare if mode == "_bare" else child_algo)(rest[0], k, factory, nprobe)
        print(json.dumps(out))
    else:
        main()
