"""`enrich quickstart`: the whole main job on a laptop, no services to configure.

1. build a small FMNIST-shop catalogue (Fashion-MNIST test garments rendered as coloured product
   photos, PNG files) and a listings JSONL in which sellers left some tags out (truth kept aside);
2. train the QUICK model (or reuse the one a previous run left in the data folder);
3. enrich the catalogue with batch mode on the embedded Postgres;
4. report what was filled and how accurate the filled tags are against the hidden truth;
5. compute similar items and write a PNG contact sheet for a few listings.
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from PIL import Image
from rich.console import Console
from rich.table import Table

from core.config import Settings
from core.db import connect, database_url
from core.images import ImageLimits
from enrich.console.users import add_user
from migrations import apply_all
from model.artifacts import store_from_settings
from model.inference import load_predictor
from model.registry import register_candidate
from schemas.taxonomy import load_taxonomy
from similar.nightly import recompute
from similar.query import read_neighbours
from similar.sheet import contact_sheet
from training.config import QUICK
from training.fmnist import load_fashion_mnist
from training.fmnist_shop import COLOUR_GROUP, build_shop, listing_texts
from training.gate import promote
from training.train import train
from worker.batch import read_listings, render_report, run_batch
from worker.pipeline import Enricher

log = logging.getLogger(__name__)
PHOTO_SIZE = 56  # 2× Fashion-MNIST, so the contact sheet shows something; the model resizes to its own size
QUICKSTART_PREFIX = "quickstart"


@dataclass(frozen=True)
class Catalogue:
    listings: Path  # JSONL of ListingEvents
    truth: dict[str, dict[str, str]]  # listing id → {group: true value}
    hidden: dict[str, list[str]]  # listing id → groups the seller left out


def build_catalogue(out_dir: Path, fmnist_dir: Path, items: int = 300, photos_per_item: int = 2,
                    seed: int = 7) -> Catalogue:
    """Write images/*.png, listings.jsonl and truth.json under out_dir from Fashion-MNIST *test* items."""
    taxonomy = load_taxonomy("fashion-mnist")
    x, y = load_fashion_mnist(fmnist_dir, "test")  # never seen by training (it uses the train split)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(x), size=items, replace=False)
    shop = build_shop(x[pick], y[pick], taxonomy, photos_per_item=photos_per_item, seed=seed, size=PHOTO_SIZE)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    colours = taxonomy.group(COLOUR_GROUP).values
    # titles and descriptions written from the truth with realistic noise (missing, wrong, French/German,
    # colour words that disagree with the photo): what the text fusion in worker/tagging.py works on
    firsts = np.array([np.flatnonzero(shop.item_ids == i)[0] for i in range(items)], dtype=np.int64)
    texts = listing_texts(shop.category[firsts], shop.colour[firsts], taxonomy, seed=seed)
    truth: dict[str, dict[str, str]] = {}
    hidden: dict[str, list[str]] = {}
    lines = []
    for i in range(items):
        lid = f"qs-{i:04d}"
        rows = np.flatnonzero(shop.item_ids == i)
        paths = []
        for j, r in enumerate(rows):
            p = img_dir / f"{lid}-{j}.png"
            Image.fromarray(shop.images[r]).save(p)
            paths.append(f"images/{p.name}")
        category = taxonomy.categories[int(shop.category[rows[0]])].name
        colour = colours[int(shop.colour[rows[0]])]
        truth[lid] = {"category": category, "type": taxonomy.type_of(category), "colour": colour}
        # sellers: a third give the category, a third the colour, a third nothing
        given = ("category",) if i % 3 == 0 else ("colour",) if i % 3 == 1 else ()
        hidden[lid] = [g for g in ("category", "type", "colour")
                       if g not in given and not (g == "type" and "category" in given)]
        event: dict[str, Any] = {"listing_id": lid, "seller_id": f"seller-{i % 17}", "title": texts[i].title,
                 "description": texts[i].description, "images": paths}
        if "category" in given:
            event["category"] = category
        if "colour" in given:
            event["attributes"] = {"colour": colour}
        lines.append(json.dumps(event))
    listings = out_dir / "listings.jsonl"
    listings.write_text("\n".join(lines) + "\n")
    (out_dir / "truth.json").write_text(json.dumps({"truth": truth, "hidden": hidden}, indent=1))
    return Catalogue(listings, truth, hidden)


def find_or_train_model(models_dir: Path, fmnist_dir: Path, retrain: bool, time_budget_s: float | None) -> Path:
    """Reuse the newest quickstart model in models_dir, else train the QUICK preset."""
    found = sorted(models_dir.glob(f"{QUICKSTART_PREFIX}-*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if found and not retrain:
        log.info("reusing model %s (pass --retrain to train a new one)", found[-1].parent.name)
        return found[-1].parent
    version = f"{QUICKSTART_PREFIX}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    cfg = replace(QUICK, out_dir=models_dir, data_dir=Path(fmnist_dir), model_version=version)
    if time_budget_s is not None:
        cfg = replace(cfg, time_budget_s=time_budget_s)
    return Path(train(cfg))


def filled_accuracy(conn: psycopg.Connection, catalogue: Catalogue) -> dict[str, dict[str, float]]:
    """Per group: how many hidden tags were filled, went to review, and accuracy of the filled ones."""
    rows = conn.execute(
        "SELECT listing_id, tag_group, value FROM listing_tags WHERE source = 'predicted' AND listing_id = ANY(%s)",
        (list(catalogue.truth),),
    ).fetchall()
    reviewed = conn.execute(
        "SELECT listing_id, tag_group FROM review_queue WHERE resolved_at IS NULL AND listing_id = ANY(%s)",
        (list(catalogue.truth),),
    ).fetchall()
    out: dict[str, dict[str, float]] = {}
    for group in ("category", "type", "colour"):
        hidden = sum(group in g for g in catalogue.hidden.values())
        filled = [(lid, v) for lid, g, v in rows if g == group]
        correct = sum(catalogue.truth[lid][group] == v for lid, v in filled)
        out[group] = {"hidden": hidden, "filled": len(filled), "review": sum(g == group for _, g in reviewed),
                      "accuracy": correct / len(filled) if filled else float("nan")}
    return out


def text_contribution(conn: psycopg.Connection, catalogue: Catalogue) -> dict[str, int]:
    """Filled tags the listing's text contributed to (predicted tags with text evidence), per group, and how
    many of those are right against the hidden truth ("correct"), of how many filled tags in all ("filled")."""
    rows = conn.execute(
        "SELECT listing_id, tag_group, value, evidence IS NOT NULL FROM listing_tags "
        "WHERE source = 'predicted' AND listing_id = ANY(%s)", (list(catalogue.truth),),
    ).fetchall()
    with_text = [(lid, g, v) for lid, g, v, ev in rows if ev]
    out = {g: sum(tg == g for _, tg, _ in with_text) for g in ("category", "type", "colour")}
    out["total"] = len(with_text)
    out["correct"] = sum(catalogue.truth.get(lid, {}).get(g) == v for lid, g, v in with_text)
    out["filled"] = len(rows)
    return out


def shelf_precision(conn: psycopg.Connection, catalogue: Catalogue, k: int = 5) -> float:
    """Share of each listing's k nearest stored neighbours whose true category is the listing's own."""
    same = total = 0
    for lid, truth in catalogue.truth.items():
        neighbours, _ = read_neighbours(conn, lid, k=k)
        same += sum(catalogue.truth.get(n.listing_id, {}).get("category") == truth["category"] for n in neighbours)
        total += len(neighbours)
    return same / total if total else float("nan")


def run_quickstart(settings: Settings, fmnist_dir: Path, items: int = 300, retrain: bool = False,
                   time_budget_s: float | None = None, examples: int = 3,
                   console: Console | None = None) -> dict[str, Any]:
    """Everything above; returns the figures it printed (for tests and the README)."""
    console = console or Console()
    t0 = time.perf_counter()
    data_dir = Path(settings.data_dir)
    qs_dir = data_dir / "quickstart"  # under the data directory: every process of the installation reads it
    console.rule("1/5 catalogue")
    catalogue = build_catalogue(qs_dir, fmnist_dir, items=items)
    console.print(f"{items} FMNIST-shop listings with {sum(len(h) for h in catalogue.hidden.values())} "
                  f"tags left out by sellers → {catalogue.listings}")

    console.rule("2/5 model")
    model_dir = find_or_train_model(data_dir / "models", fmnist_dir, retrain, time_budget_s)
    predictor = load_predictor(model_dir, device="cpu")
    console.print(f"model {predictor.version} ({predictor.manifest.backbone}, {predictor.manifest.image_size}px) "
                  f"from {model_dir}")

    console.rule("3/5 enrich")
    url = database_url(settings)
    conn = connect(url, autocommit=True)
    try:
        apply_all(conn)
        # the training registry's gate decides: a fresh database gets this model as its first active one
        register_candidate(conn, model_dir, store_from_settings(settings), actor="quickstart",
                           reason="the quickstart's demo model")
        decision = promote(conn, predictor.version, settings, actor="quickstart",
                           reason="the quickstart's demo model")
        console.print(f"registry: {decision.candidate} " + ("is the active model" if decision.promoted else
                      f"not promoted over {decision.previous}: {'; '.join(decision.reasons)}"))
        events, invalid, origins = read_listings(catalogue.listings)
        enricher = Enricher(predictor, settings)
        report = run_batch(conn, enricher, events, origins=origins)
        report.invalid = invalid
        render_report(report, console, max_rows=12)

        console.rule("4/5 accuracy of the filled tags (vs. the hidden truth)")
        acc = filled_accuracy(conn, catalogue)
        table = Table()
        for col in ("group", "left out", "filled", "to review", "accuracy of filled"):
            table.add_column(col, justify="left" if col == "group" else "right")
        for group, a in acc.items():
            table.add_row(group, str(int(a["hidden"])), str(int(a["filled"])), str(int(a["review"])),
                          "—" if a["accuracy"] != a["accuracy"] else f"{a['accuracy']:.1%}")
        console.print(table)
        text = text_contribution(conn, catalogue)
        console.print(f"text evidence (titles/descriptions) on {text['total']} of {text['filled']} filled tags "
                      f"(category {text['category']}, type {text['type']}, colour {text['colour']}); "
                      f"{text['correct']} of them right")

        console.rule("5/5 similar items")
        result = recompute(conn, predictor.version, settings=settings, k=8, root=data_dir / "index", progress=False)
        console.print(result.summary())
        shelf = shelf_precision(conn, catalogue)
        console.print(f"shelf precision: {shelf:.1%} of each listing's 5 nearest neighbours share its true category "
                      f"(beside the tag accuracy above)")
        sheets = []
        for lid in sorted(catalogue.truth)[:examples]:
            neighbours, _ = read_neighbours(conn, lid, predictor.version, 8)
            t = Table(title=f"similar to {lid} ({catalogue.truth[lid]['category']}, {catalogue.truth[lid]['colour']})")
            t.add_column("listing")
            t.add_column("score", justify="right")
            t.add_column("true category")
            t.add_column("true colour")
            for n in neighbours[:5]:
                truth = catalogue.truth.get(n.listing_id, {})
                t.add_row(n.listing_id, f"{n.score:.3f}", truth.get("category", "?"), truth.get("colour", "?"))
            console.print(t)
            png = qs_dir / f"similar-{lid}.png"
            contact_sheet(conn, lid, neighbours, png, limits=ImageLimits.from_settings(settings))
            sheets.append(png)
        console.print("contact sheets: " + ", ".join(str(p) for p in sheets))
    finally:
        conn.close()
    seconds = time.perf_counter() - t0
    console.print(f"[bold]quickstart done in {seconds:.0f}s[/bold]. Next: `enrich similar qs-0000 --png out.png`, "
                  f"`enrich batch {catalogue.listings}`. To review and correct tags in the browser: "
                  f"`enrich quickstart --console`, or `enrich console-user add me --role admin`, then "
                  f"`enrich console` (http://127.0.0.1:8080/).")
    return {"accuracy": acc, "shelf_precision": shelf, "text": text, "enriched": len(report.enrichments),
            "failed": len(report.failed), "model_dir": str(model_dir), "sheets": [str(p) for p in sheets],
            "seconds": seconds}


DEMO_ADMIN = "quickstart-admin"


def demo_admin(settings: Settings) -> str:
    """Create (or reset) the demo's console admin with a new random password; returns it (shown once)."""
    password = secrets.token_urlsafe(12)
    conn = connect(database_url(settings), autocommit=True)
    try:
        add_user(conn, DEMO_ADMIN, password, "admin")
    finally:
        conn.close()
    return password

