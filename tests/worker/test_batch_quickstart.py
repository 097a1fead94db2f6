"""Batch mode and the quickstart flow through the real CLI, on real Postgres and the embedded default."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from core.config import Settings
from enrich.cli import app
from enrich.quickstart import run_quickstart
from harness.images import png_bytes
from schemas.enrichment import Enrichment, TagSource, TagValue
from tests.worker.test_intake_poison import refused_by_database
from worker.batch import BatchReport, read_listings, render_report


def test_read_listings_jsonl_folder_and_images(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "b.jpg").write_bytes(b"whatever")
    events, invalid, origins = read_listings(tmp_path)
    assert [e.listing_id for e in events] == ["a", "b"] and origins == ["a.png", "b.jpg"]  # one per image file
    jsonl = tmp_path / "l.jsonl"
    jsonl.write_text(json.dumps({"listing_id": "x", "seller_id": "s", "images": ["a.png"]}) + "\n{broken\n"
                     + json.dumps({"listing_id": "y"}) + "\n")
    events, invalid, origins = read_listings(jsonl)
    assert [e.listing_id for e in events] == ["x"] and events[0].images == [str(tmp_path / "a.png")]
    assert [w for w, _ in invalid] == ["l.jsonl:2", "l.jsonl:3"] and origins == ["l.jsonl:1"]


def test_batch_command_fills_tags_and_rerun_is_a_no_op(tmp_path, pg_url, db, model_dir, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    for i in range(5):
        (tmp_path / f"p{i}.png").write_bytes(png_bytes((50 * i, 80, 120)))
    lines = [{"listing_id": f"b{i}", "seller_id": "s", "images": [f"p{i}.png"]} for i in range(5)]
    lines[0]["category"] = "Sneaker"
    lines.append({"listing_id": "b-bad", "seller_id": "s", "images": ["missing.png"]})
    (tmp_path / "listings.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    runner = CliRunner()
    args = ["batch", str(tmp_path / "listings.jsonl"), "--model-dir", str(model_dir), "--database-url", pg_url]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # one row failed
    assert "tags filled by the model" in result.output
    assert "6 listings read, 5 enriched" in result.output and "1 failed" in result.output
    assert "b-bad: no usable image: not found" in result.output
    assert db.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 5
    assert db.execute("SELECT source FROM listing_tags WHERE listing_id = 'b0' AND tag_group = 'category'"
                      ).fetchone()[0] == "seller"
    tags_before = db.execute("SELECT * FROM listing_tags ORDER BY 1, 2").fetchall()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 enriched" in again.output and "6 already done" in again.output
    assert db.execute("SELECT * FROM listing_tags ORDER BY 1, 2").fetchall() == tags_before


def test_batch_reports_bad_rows_by_line_and_enriches_the_rest(tmp_path, pg_url, db, model_dir, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    (tmp_path / "p.png").write_bytes(png_bytes())
    rows = [{"listing_id": f"r{i}", "seller_id": "s", "images": ["p.png"]} for i in range(4)]
    rows[1]["title"] = "nul \u0000 here"  # invalid: no store can hold it
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with refused_by_database(db, "r2", "check_violation"):  # passes validation, refused by Postgres
        result = CliRunner().invoke(app, ["batch", str(tmp_path / "l.jsonl"), "--model-dir", str(model_dir),
                                          "--database-url", pg_url])
    assert result.exit_code == 1, result.output
    assert "invalid l.jsonl:2: title: Value error, contains a NUL character" in result.output
    assert "refused l.jsonl:3: db_refused: 23514 listing r2 refused by a test constraint" in result.output
    assert "2 enriched" in result.output
    assert sorted(r[0] for r in db.execute("SELECT listing_id FROM embeddings").fetchall()) == ["r0", "r3"]


def test_batch_refuses_local_paths_when_disabled(tmp_path, pg_url, db, model_dir):
    (tmp_path / "p.png").write_bytes(png_bytes())
    (tmp_path / "l.jsonl").write_text(json.dumps({"listing_id": "z", "seller_id": "s", "images": ["p.png"]}) + "\n")
    result = CliRunner().invoke(app, ["batch", str(tmp_path / "l.jsonl"), "--model-dir", str(model_dir),
                                      "--database-url", pg_url, "--no-local-paths"])
    assert result.exit_code == 1 and "local paths disabled" in result.output


@pytest.mark.integration  # embedded Postgres: a real server process
def test_quickstart_flow_on_embedded_postgres(tmp_path, model_dir, fmnist_dir, monkeypatch):
    """Everything but training (a quickstart model already in the data folder is reused)."""
    monkeypatch.delenv("ENRICH_DATABASE_URL", raising=False)
    data = tmp_path / "data"
    shutil.copytree(model_dir, data / "models" / "quickstart-test")
    console = Console(width=160, record=True)
    out = run_quickstart(Settings(data_dir=data), fmnist_dir, items=24, examples=2, console=console)
    text = console.export_text()
    assert out["enriched"] == 24 and out["failed"] == 0
    assert out["accuracy"]["category"]["hidden"] == 16  # 1/3 of sellers gave a category
    acc = out["accuracy"]["colour"]
    assert acc["filled"] + acc["review"] == acc["hidden"] == 16
    assert "accuracy of the filled tags" in text and "similar to qs-0000" in text
    assert "is the active model" in text  # registered and promoted through the training registry
    # the share of each shelf in the listing's true category, measured on the stored shelves
    assert "shelf precision:" in text and 0.0 < out["shelf_precision"] <= 1.0
    # the listings carry noisy titles; the line says how many filled tags the text contributed to
    assert "text evidence (titles/descriptions) on" in text
    filled = sum(int(a["filled"]) for a in out["accuracy"].values())
    assert out["text"]["filled"] == filled and 0 < out["text"]["total"] <= filled
    for sheet in out["sheets"]:
        assert Image.open(sheet).size[0] > 100
    # a second run reuses the model and the rows: nothing is enriched twice
    again = run_quickstart(Settings(data_dir=data), fmnist_dir, items=24, examples=1,
                           console=Console(width=160, record=True))
    assert again["enriched"] == 0 and again["model_dir"] == out["model_dir"]


def test_the_batch_report_shows_groups_that_do_not_apply_as_n_a():
    tags = {"texture": TagValue(value="solid", source=TagSource.predicted, confidence=0.9, model_version="m")}
    report = BatchReport(enrichments=[Enrichment(listing_id="jeans-1", model_version="m", tags=tags,
                                                 not_applicable=["sleeve", "neckline"])])
    console = Console(width=120, record=True)
    render_report(report, console)
    text = console.export_text()
    lines = [" ".join(line.replace("│", " ").split()) for line in text.splitlines()]
    assert "jeans-1 texture solid 0.90" in lines and "jeans-1 sleeve n/a" in lines and "jeans-1 neckline n/a" in lines
    assert "1 tags filled, 2 groups n/a" in text
