"""Does a retraining job with corrections fix the pair people corrected? Per-class accuracy of a confused pair
(default Shirt vs T-shirt/top) before and after a retraining job with corrections, quick preset.

    nice -n 10 python benchmarks/retrain_corrections.py       # QUICK's budget, 3 trainings: ~20 min on 2 cores
    python benchmarks/retrain_corrections.py --time-budget 120 --no-control

What it does (Postgres at ENRICH_TEST_PG_ADMIN_URL, default 127.0.0.1:5432; a throwaway database):
  1. baseline: the QUICK preset without corrections, registered and promoted (the active model);
  2. a catalogue: a random half of the Fashion-MNIST *test* garments as FMNIST-shop listings (PNG photos,
     as the quickstart renders them); the baseline tags each listing's category from its first photo;
  3. the listings of the pair whose tag was wrong are corrected to the truth (rows in `listings` and
     `corrections`, as the corrections intake stores them);
  4. a retraining job through `training.jobs.run_job` — the job's real chain: corrected labels from Postgres,
     photos through the worker's guarded fetcher, warm start from the active model, evaluation, registration;
  5. control (unless --no-control): the same job without corrections (same warm start, same budget), so
     that what more training alone does is not credited to the corrections;
  6. measures every model on the other half of the test garments (their rows of the fixed FMNIST-shop
     evaluation set: no corrected garment is measured): the pair's per-class accuracy, how often one is
     taken for the other, and top-1 over all classes. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get("ENRICH_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PHOTO_SIZE = 56  # as the quickstart's catalogue


def _predict(model_dir: Path, images: np.ndarray, device: str) -> np.ndarray:
    """Category index per photo, predicted as the worker does (the manifest's size, mixed precision)."""
    from model.checkpoint import load_model
    from model.inference import resolve_device
    from training.data import LabelledImages
    from training.evaluate import predict_dataset

    dev = resolve_device(device)
    model, manifest = load_model(model_dir)
    model = model.to(dev)
    n = len(images)
    data = LabelledImages(images, np.zeros(n, np.int64), np.zeros(n, np.int64), {})
    return predict_dataset(model, data, manifest.image_size, dev).category.argmax(axis=1)


def _measure(model_dir: Path, split, rows: np.ndarray, pair: tuple[int, int], names: list[str], device: str) -> dict:
    pred = _predict(model_dir, split.data.images[rows], device)
    true = split.data.category[rows]
    a, b = pair
    out = {"top1": float((pred == true).mean())}
    for c, other in ((a, b), (b, a)):
        mask = true == c
        out[f"acc/{names[c]}"] = float((pred[mask] == c).mean())
        out[f"as_other/{names[c]}"] = float((pred[mask] == other).mean())  # taken for the other one of the pair
    out["pair_mean_acc"] = (out[f"acc/{names[a]}"] + out[f"acc/{names[b]}"]) / 2
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fmnist-dir", type=Path, default=Path(os.environ.get("ENRICH_FMNIST_DIR",
                                                                          "/usr/share/datasets/fashion-mnist")))
    ap.add_argument("--pair", default="Shirt,T-shirt/top", help="the confused pair (default: %(default)s)")
    ap.add_argument("--time-budget", type=float, default=None, help="training seconds per run (default: QUICK's)")
    ap.add_argument("--catalogue-share", type=float, default=0.5, help="share of the test garments listed in the "
                                                                       "catalogue (the rest is measured)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-control", action="store_true", help="skip the control job without corrections")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep models and photos here (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import psycopg
    from PIL import Image

    from core.config import Settings
    from migrations import apply_all
    from model.registry import promote, register_candidate
    from schemas.taxonomy import load_taxonomy
    from training import jobs
    from training.config import QUICK
    from training.fmnist import load_fashion_mnist
    from training.fmnist_shop import build_shop
    from training.prepare import fmnist_shop_test
    from training.train import train

    taxonomy = load_taxonomy("fashion-mnist")
    names = taxonomy.category_names
    pair = tuple(names.index(n) for n in args.pair.split(","))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="retrain-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    dbname = f"enrich_bench_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(ADMIN_URL, autocommit=True)
    admin.execute(f'CREATE DATABASE "{dbname}"')
    url = psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=dbname)
    figures: dict = {"pair": args.pair, "time_budget_s": args.time_budget or QUICK.time_budget_s}
    t_all = time.perf_counter()
    try:
        conn = psycopg.connect(url, autocommit=True)
        apply_all(conn)
        settings = Settings(database_url=url, data_dir=work, retrain_preset="quick", retrain_dataset="fmnist-shop",
                            retrain_data_dir=args.fmnist_dir, allow_local_paths=True, auto_promote=False,
                            device=args.device)

        # 1. baseline, the active model
        t0 = time.perf_counter()
        cfg = replace(QUICK, out_dir=settings.models_dir, data_dir=args.fmnist_dir, model_version="bench-baseline",
                      device=args.device, progress=False,
                      **({"time_budget_s": args.time_budget} if args.time_budget else {}))
        baseline = Path(train(cfg))
        register_candidate(conn, baseline, actor="bench", reason="baseline without corrections")
        promote(conn, "bench-baseline", actor="bench")
        figures["baseline_train_s"] = round(time.perf_counter() - t0, 1)

        # 2. the catalogue (half the test garments) and the measured half
        xt, yt = load_fashion_mnist(args.fmnist_dir, "test")
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(xt))
        listed = np.sort(order[:int(len(xt) * args.catalogue_share)])
        measured_items = np.sort(order[int(len(xt) * args.catalogue_share):])
        shop = build_shop(xt[listed], yt[listed], taxonomy, photos_per_item=2, seed=args.seed, size=PHOTO_SIZE)
        first = np.flatnonzero(shop.is_query)  # each listing's first photo: the plain rendering
        item_of_row = shop.item_ids[first]
        tags = _predict(baseline, shop.images[first], args.device)
        truth = shop.category[first]

        # 3. corrections: the pair's listings whose tag was wrong, corrected to the truth
        wrong = np.flatnonzero(np.isin(truth, pair) & (tags != truth))
        photos = work / "catalogue"
        photos.mkdir(exist_ok=True)
        with conn.transaction():
            for r in wrong:
                lid = f"bench-{int(listed[item_of_row[r]]):05d}"
                path = photos / f"{lid}.png"
                Image.fromarray(shop.images[first[r]]).save(path)
                conn.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash)"
                             " VALUES (%s, 'bench', %s::jsonb, 'h')", (lid, json.dumps({"images": [str(path)]})))
                conn.execute("INSERT INTO corrections (event_id, listing_id, tag_group, old_value, new_value,"
                             " corrected_by, corrected_at) VALUES (%s, %s, 'category', %s, %s, 'reviewer', now())",
                             (f"bench-{lid}", lid, names[tags[r]], names[truth[r]]))
        in_pair = np.isin(truth, pair)
        figures["catalogue_listings"] = int(len(first))
        figures["pair_listings"] = int(in_pair.sum())
        figures["baseline_wrong_on_pair_listings"] = round(float((tags[in_pair] != truth[in_pair]).mean()), 4)
        figures["corrections"] = int(len(wrong))

        # 4./5. retraining jobs: with corrections, and the control without
        runs = {"with corrections": {}}
        if not args.no_control:
            runs["control, no corrections"] = {"corrections": False}
        budget = {"time_budget_s": args.time_budget} if args.time_budget else {}
        models = {"baseline": baseline}
        for label, params in runs.items():
            t0 = time.perf_counter()
            job_id = jobs.create_job(conn, trigger="admin", requested_by="bench", reason=label,
                                     params={**params, **budget})
            result = jobs.run_job(url, job_id, settings)
            job = jobs.get_job(conn, job_id)
            models[label] = settings.models_dir / result["model_version"]
            figures[f"job/{label}"] = {"outcome": job["outcome"], "warm_start": job["progress"].get("warm_start"),
                                       "correction_rows": job["progress"].get("correction_rows"),
                                       "seconds": round(time.perf_counter() - t0, 1)}

        # 6. measure on the garments no one corrected
        split, _, _ = fmnist_shop_test(replace(QUICK, data_dir=args.fmnist_dir), taxonomy)
        rows = np.flatnonzero(np.isin(split.data.item_ids, measured_items))
        figures["measured_rows"] = int(len(rows))
        figures["measured_pair_rows"] = int(np.isin(split.data.category[rows], pair).sum())
        results = {label: _measure(d, split, rows, pair, names, args.device) for label, d in models.items()}
        figures["results"] = results
        conn.close()
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        admin.close()
    figures["total_s"] = round(time.perf_counter() - t_all, 1)

    a, b = (names[i] for i in pair)
    print(f"\ncatalogue: {figures['catalogue_listings']} listings, {figures['pair_listings']} of {a} / {b}; the "
          f"baseline tagged {figures['baseline_wrong_on_pair_listings']:.1%} of those wrong → "
          f"{figures['corrections']} corrections")
    print(f"measured on {figures['measured_rows']} evaluation photos of the other garments "
          f"({figures['measured_pair_rows']} of the pair)\n")
    head = f"{'model':28s} {'acc ' + a:>12s} {'acc ' + b:>18s} {a + '→' + b:>20s} {b + '→' + a:>20s} {'top-1':>7s}"
    print(head)
    for label, r in results.items():
        print(f"{label:28s} {r[f'acc/{a}']:12.4f} {r[f'acc/{b}']:18.4f} {r[f'as_other/{a}']:20.4f} "
              f"{r[f'as_other/{b}']:20.4f} {r['top1']:7.4f}")
    print()
    print(json.dumps(figures, default=str))


if __name__ == "__main__":
    main()
