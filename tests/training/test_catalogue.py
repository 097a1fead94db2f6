"""Seller labels as noisy data: the catalogue reader over Postgres and a JSONL export, and
`enrich train --dataset catalogue` with a marketplace's own taxonomy, per-task loss weights on and off."""
import hashlib
import json
from dataclasses import replace

import pytest
from PIL import Image
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

from core.config import Settings
from schemas.events import ListingEvent
from schemas.taxonomy import Taxonomy
from training.catalogue import (
    CatalogueRow,
    read_rows,
    rows_from_jsonl,
    rows_from_postgres,
    rows_to_images,
    split_of,
    split_rows,
)
from training.config import TINY
from training.losses import MISSING

TAXONOMY = {
    "name": "shop-2026", "version": 1, "types": ["top", "bottom"],
    "categories": [{"name": "tee", "type": "top"}, {"name": "jeans", "type": "bottom"},
                   {"name": "hoodie", "type": "top"}],
    "attribute_groups": [
        {"name": "colour", "exclusive": True, "values": ["red", "green", "blue"]},
        {"name": "style", "exclusive": False, "values": ["casual", "formal", "sport"]},
    ],
}
RGB = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
CATS = ["tee", "jeans", "hoodie"]
N = 48


def _listings(tmp_path):
    """N listings with 2 photos each; listing 0: an unknown colour, listing 1: no colour (a missing group),
    listing 2: an unknown group; every 5th listing a corrected colour."""
    photos = tmp_path / "photos"
    photos.mkdir()
    events, corrected = [], {}
    for i in range(N):
        cat, colour = CATS[i % 3], list(RGB)[i % 3 if i % 4 else (i + 1) % 3]  # every 4th: a noisy colour
        uris = []
        for k in range(2):
            img = Image.new("RGB", (20, 20), RGB[list(RGB)[i % 3]])
            img.paste((255, 255, 255) if cat == "tee" else (0, 0, 0), (0, 0, 10 if cat != "jeans" else 20, 6 + k))
            path = photos / f"l{i:02d}-{k}.png"
            img.save(path)
            uris.append(str(path))
        attrs = {"colour": colour}
        if i % 3 == 0:  # a sparse group: the per-task weights weigh it by its share of labels, with a floor
            attrs["style"] = "casual" if i % 2 else "formal,sport"
        if i == 0:
            attrs["colour"] = "purple"
        if i == 1:
            del attrs["colour"]
        if i == 2:
            attrs["fit"] = "slim"
        events.append(ListingEvent(listing_id=f"l{i:02d}", seller_id="s1", images=uris, category=cat,
                                   attributes=attrs))
        if i % 5 == 0:
            corrected[f"l{i:02d}"] = list(RGB)[i % 3]  # the true colour
    return events, corrected


def _write_postgres(db, events, corrected):
    for ev in events:
        body = ev.model_dump(mode="json")
        db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash) VALUES (%s, %s, %s, %s)",
                   (ev.listing_id, ev.seller_id, Jsonb(body), hashlib.sha256(json.dumps(body).encode()).hexdigest()))
        db.execute("INSERT INTO listing_tags (listing_id, tag_group, value, source) VALUES (%s, 'category', %s,"
                   " 'seller')", (ev.listing_id, ev.category))
        db.execute("INSERT INTO listing_tags (listing_id, tag_group, value, source, confidence, model_version)"
                   " VALUES (%s, 'type', 'top', 'predicted', 0.9, 'm1')", (ev.listing_id,))
    for lid, value in corrected.items():
        db.execute("INSERT INTO listing_tags (listing_id, tag_group, value, source) VALUES (%s, 'colour', %s,"
                   " 'corrected')", (lid, value))


def _write_jsonl(path, events, corrected):
    lines = [ev.model_dump_json() for ev in events]
    for lid, value in corrected.items():  # an older correction first: the latest wins
        for t, v in (("2026-01-01T00:00:00Z", "green" if value != "green" else "red"), ("2026-02-01T00:00:00Z", value)):
            lines.append(json.dumps({"event_id": f"c-{lid}-{t[:7]}", "listing_id": lid, "group": "colour",
                                     "new_value": v, "corrected_by": "ops", "corrected_at": t}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def catalogue(db, tmp_path):
    events, corrected = _listings(tmp_path)
    _write_postgres(db, events, corrected)
    export = _write_jsonl(tmp_path / "export.jsonl", events, corrected)
    tax = tmp_path / "shop-2026.json"
    tax.write_text(json.dumps(TAXONOMY))
    return events, corrected, export, tax


def _load(uri):
    return Image.open(uri)


def test_reader_labels_corrections_masks_and_splits(db, pg_url, catalogue, tmp_path):
    events, _, export, _ = catalogue
    rows = rows_from_postgres(db)
    assert [r.listing_id for r in rows] == sorted(ev.listing_id for ev in events)
    by_id = {r.listing_id: r for r in rows}
    assert by_id["l20"].seller["colour"] == "red" and by_id["l20"].labels["colour"] == "blue"  # corrected wins
    assert "type" not in by_id["l20"].labels  # predicted tags are no labels
    # the JSONL export gives the same rows
    settings = Settings(data_dir=tmp_path / "data", database_url=pg_url)
    assert read_rows("postgres", settings) == rows  # the database of the settings given
    assert rows_from_jsonl(export) == rows and read_rows(export.parent, settings) == rows  # a file, a folder export
    taxonomy = Taxonomy.model_validate(TAXONOMY)
    data, query, n = rows_to_images(rows[:4], taxonomy, _load, size=16, photos_per_item=2)
    assert n == 4 and data.images.shape == (8, 16, 16, 3) and query.tolist() == [True, False] * 4
    colour = data.groups["colour"][::2]
    assert colour[0] == 0  # l00: seller's 'purple' is unknown, but the correction says red
    assert colour[1] == MISSING  # l01: no colour given
    assert colour[2] == 2 and colour[3] == 0  # l02 (its unknown group 'fit' ignored); l03 red
    assert data.category[::2].tolist() == [0, 1, 2, 0] and data.item_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert data.present["style"][::2].tolist() == [True, False, False, True]  # l01, l02: no style given
    assert data.groups["style"][0].tolist() == [0, 1, 1] and data.groups["style"][6].tolist() == [1, 0, 0]
    # unknown style value: the group is masked for that row
    odd = [CatalogueRow("x", rows[0].images, {"category": "tee", "style": "boho"})]
    assert not rows_to_images(odd, taxonomy, _load, 16, 1)[0].present["style"].any()
    # corrected listings repeat at full weight in training
    assert len(rows_to_images(rows[:6], taxonomy, _load, 16, 1, repeats_corrected=3)[0]) == 6 + 2 * 2
    # the per-task weights: the sparse style group weighs by its share of labels
    from training.train import build_criterion

    all_rows = rows_to_images(rows, taxonomy, _load, 16, 1)[0]
    off = build_criterion(all_rows, taxonomy, replace(TINY, group_loss_weights={})).group_task_weight
    on = build_criterion(all_rows, taxonomy, replace(TINY, group_loss_weights={}, task_weights=True))
    assert off == {"colour": 1.0, "style": 1.0}
    assert on.group_task_weight["colour"] == 1.0 and 0.3 < on.group_task_weight["style"] < 0.4  # 16 of 47
    # deterministic split by listing id
    parts = split_rows(rows)
    assert all(parts[s] for s in ("train", "val", "test"))
    assert [split_of(r.listing_id) for r in rows] == [split_of(r.listing_id) for r in rows_from_jsonl(export)]
    assert {r.listing_id for r in parts["test"]} == {r.listing_id for r in rows if split_of(r.listing_id) == "test"}


def _style_weights(model_dir) -> list[float]:
    """The style group's loss factor each classification step of a training run used, solved from the losses its
    report recorded: a step's total is λret·(triplet + λcond·condition) + λcls·(cat + type + Σ_g w_g·L_g), the
    parts unweighted. Colour's factor is the preset's fixed 0.1 (colour has the most labels: per-task weight 1)."""
    history = json.loads((model_dir / "report" / "metrics.json").read_text())["history"]
    w, colour = TINY.loss_weights, TINY.group_loss_weights["colour"]
    out = []
    for step in history:
        if step.get("attr/style", 0.0) < 1e-3:  # no classification in the step, or no style label in its batch
            continue
        cls = step["total"] - w.ret * (step.get("triplet", 0.0) + w.condition * step.get("condition", 0.0))
        out.append((cls / w.cls - step["cat"] - step.get("type", 0.0) - colour * step["attr/colour"])
                   / step["attr/style"])
    return out


def test_train_on_seller_labels_with_task_weights_on_and_off(db, pg_url, catalogue, tmp_path, monkeypatch):
    from enrich.cli import app

    _, _, export, tax = catalogue
    monkeypatch.setenv("ENRICH_ALLOW_LOCAL_PATHS", "true")
    monkeypatch.setenv("ENRICH_DATABASE_URL", pg_url)
    runner = CliRunner()
    models = {}
    for name, source, flag in (("tw-on", "postgres", "--task-weights"), ("tw-off", str(export), "--no-task-weights")):
        res = runner.invoke(app, ["train", "--preset", "tiny", "--catalogue", source, "--taxonomy", str(tax),
                                  "--device", "cpu", "--out-dir", str(tmp_path / "models"), "--model-version", name,
                                  "--no-amp", "--image-size", "32", flag])
        assert res.exit_code == 0, res.output
        out = json.loads(res.output[res.output.index("{"):])
        models[name] = out
        assert out["metrics"]["test/map/category"] >= 0 and "test/map/colour" in out["metrics"]
        assert "test/map/style" in out["metrics"]
        model_dir = tmp_path / "models" / name
        manifest = json.loads((model_dir / "manifest.json").read_text())
        assert manifest["dataset"] == "catalogue" and manifest["eval_set"].startswith("catalogue:shop-2026:test:")
        report = json.loads((model_dir / "report" / "metrics.json").read_text())
        assert report["config"]["task_weights"] is (flag == "--task-weights")
        assert "map/colour" not in report["per_group_map"] and "colour" in report["per_group_map"]
        assert "## Per-group mAP (test)" in (model_dir / "report" / "summary.md").read_text()
    # the flag reaches the loss: with it, the sparse style group trained at its share of the labels (about a
    # third of colour's), without it at 1
    on_w, off_w = _style_weights(tmp_path / "models" / "tw-on"), _style_weights(tmp_path / "models" / "tw-off")
    assert on_w and off_w
    assert off_w == pytest.approx([1.0] * len(off_w), abs=1e-3)
    assert on_w == pytest.approx([on_w[0]] * len(on_w), abs=1e-3) and 0.2 < on_w[0] < 0.6
    # the same test split from either source: the same evaluation set
    on = json.loads((tmp_path / "models" / "tw-on" / "manifest.json").read_text())
    off = json.loads((tmp_path / "models" / "tw-off" / "manifest.json").read_text())
    assert on["eval_set"] == off["eval_set"]
    # enrich evaluate measures the model on the catalogue's test split again
    res = runner.invoke(app, ["evaluate", str(tmp_path / "models" / "tw-off"), "--device", "cpu", "--fp32"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output[res.output.index("{"):])
    assert "test/map/category" in metrics and f"evaluation set {off['eval_set']}" in res.output
    trained = models["tw-off"]["metrics"]
    assert metrics["eval/test_rows"] == trained["eval/test_rows"] > 0
    assert 0.0 <= metrics["test/map/category"] <= 1.0


def test_catalogue_needs_a_source(tmp_path):
    from enrich.cli import app

    res = CliRunner().invoke(app, ["train", "--preset", "tiny", "--dataset", "catalogue"])
    assert res.exit_code != 0 and "--catalogue" in res.output


def test_retrain_job_honours_task_weight_setting(tmp_path):
    from core.config import Settings
    from training.jobs import job_config

    for flag in (False, True):
        cfg = job_config({"preset": "tiny"}, Settings(data_dir=tmp_path, retrain_task_weights=flag), job_id=1)
        assert cfg.task_weights is flag


def test_retrain_job_trains_on_the_catalogue_when_configured(tmp_path):
    from core.config import Settings
    from training.eval_sets import eval_config
    from training.jobs import job_config

    settings = Settings(data_dir=tmp_path, retrain_dataset="catalogue", retrain_catalogue="/exports/shop.jsonl",
                        retrain_taxonomy="fashion-mnist")
    cfg = job_config({"preset": "tiny"}, settings, job_id=3)
    assert (cfg.dataset, cfg.catalogue_source, cfg.taxonomy) == ("catalogue", "/exports/shop.jsonl", "fashion-mnist")
    assert eval_config(cfg).catalogue_source == "/exports/shop.jsonl"  # candidate and active on one set
    with pytest.raises(ValueError, match="ENRICH_RETRAIN_TAXONOMY"):
        job_config({"preset": "tiny"}, Settings(data_dir=tmp_path, retrain_dataset="catalogue"), job_id=4)

