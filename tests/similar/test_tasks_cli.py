"""`enrich reindex` / `enrich similar` commands and the Celery tasks on a real Redis broker."""
from __future__ import annotations

import time
import uuid

import pytest
import torch
from celery.contrib.testing.worker import start_worker
from PIL import Image
from similar_helpers import add_listings, clustered, exact_neighbours
from typer.testing import CliRunner

from core.celery_app import app as celery_app
from core.celery_app import configure
from core.config import Settings, get_settings
from enrich.cli import app as cli
from model.checkpoint import save_model
from model.inference import load_predictor
from model.network import build_model
from schemas.taxonomy import load_taxonomy
from similar import query
from similar import store as sdb

REDIS = "redis://127.0.0.1:6379/0"
IDS = [f"cli-{i:02d}" for i in range(40)]


@pytest.fixture()
def env(monkeypatch, pg_url, root):
    """The commands and tasks here read their settings from the environment, as a process start does."""
    monkeypatch.setenv("ENRICH_DATABASE_URL", pg_url)
    monkeypatch.setenv("ENRICH_INDEX_DIR", str(root))
    monkeypatch.setenv("COLUMNS", "200")  # rich would wrap the lines we look for
    return get_settings()


def test_reindex_then_similar_with_contact_sheet(db, env, tmp_path):
    images = []
    for i in range(len(IDS)):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 60), (i * 6, 100, 200 - i * 4)).save(path)
        images.append(str(path))
    images[1] = "https://cdn.example.com/not-local.jpg"  # skipped gracefully
    vecs = clustered(len(IDS), seed=30)
    add_listings(db, IDS, vecs, images=images, tags={i: {"category": "Dress"} for i in IDS})
    runner = CliRunner()

    out = runner.invoke(cli, ["reindex", "--k", "5"])
    assert out.exit_code == 0, out.output
    assert f"top-5 for {len(IDS)} listings" in out.output

    sheet = tmp_path / "sheet.png"
    out = runner.invoke(cli, ["similar", "cli-00", "--k", "3", "--png", str(sheet)])
    assert out.exit_code == 0, out.output
    expected = exact_neighbours(vecs, IDS, 3)["cli-00"]
    for lid in expected:
        assert lid in out.output
    assert "nightly" in out.output
    with Image.open(sheet) as img:
        assert img.format == "PNG"
        assert img.convert("RGB").getpixel((80, 80)) == (0, 100, 200)  # the query's own photo, first tile
        assert img.convert("RGB").getpixel((80, 10)) == (0, 100, 200)  # a 40×60 photo enlarged to the tile
    shown = 4 - int("cli-01" in expected)
    assert f"({shown} of 4 images found)" in out.output

    out = runner.invoke(cli, ["similar", "cli-00", "--same-category", "--k", "3"])
    assert out.exit_code == 0 and "live" in out.output
    out = runner.invoke(cli, ["similar", "nope"])
    assert out.exit_code == 2 and "no live embedding" in out.output


def test_reindex_without_embeddings_says_so(db, env):
    out = CliRunner().invoke(cli, ["reindex"])
    assert out.exit_code == 2 and "no embeddings" in out.output


def test_nightly_task_shards_over_a_real_worker(db, env, monkeypatch):
    vecs = clustered(len(IDS), seed=31)
    add_listings(db, IDS, vecs)
    queue = f"cpu-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("ENRICH_CELERY_BROKER_URL", REDIS)
    monkeypatch.setenv("ENRICH_CELERY_RESULT_BACKEND", REDIS)  # a chord needs a result backend
    configure(get_settings())
    celery_app.conf.task_default_queue = queue  # shards go where this test's worker listens
    try:
        _run_sharded(queue, db)
    finally:
        monkeypatch.undo()
        configure(Settings())
    version = sdb.active_version(db, "m1")
    assert version is not None
    info = sdb.version_info(db, version)
    assert info is not None and len(info.params["shards"]) == 3
    rows = dict(db.execute("SELECT listing_id, neighbour_ids FROM similar_items WHERE version = %s",
                           (version,)).fetchall())
    assert rows == exact_neighbours(vecs, IDS, 4)


def _run_sharded(queue: str, db) -> None:
    with start_worker(celery_app, pool="solo", perform_ping_check=False, queues=[queue], shutdown_timeout=30):
        celery_app.send_task("enrich.reindex", kwargs={"model_version": "m1", "k": 4, "shards": 3}, queue=queue)
        deadline = time.monotonic() + 60
        while sdb.active_version(db, "m1") is None and time.monotonic() < deadline:
            time.sleep(0.2)
    assert sdb.active_version(db, "m1") is not None, "the chord never switched"


def test_similar_by_attribute_uses_the_models_condition_mask(db, env, tmp_path):
    """`--by colour` loads the real model's mask of the colour group (small CNN, random init) and ranks with it."""
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    save_model(build_model("small_cnn", load_taxonomy("fashion-mnist"), pretrained=False), model_dir,
               model_version="sim-test-v1", image_size=32)
    mask = load_predictor(model_dir, device="cpu").condition_masks()["colour"]
    vecs = clustered(len(IDS), dim=mask.shape[0], seed=32)
    add_listings(db, IDS, vecs, model_version="sim-test-v1")
    expected = query.similar_to(db, "cli-00", "sim-test-v1", 3, mask=mask)

    out = CliRunner().invoke(cli, ["similar", "cli-00", "-m", "sim-test-v1", "--by", "colour", "--k", "3",
                                   "--model-dir", str(model_dir)])
    assert out.exit_code == 0, out.output
    assert "by colour" in out.output
    for n in expected:
        assert n.listing_id in out.output and f"{n.score:.4f}" in out.output
    out = CliRunner().invoke(cli, ["similar", "cli-00", "-m", "sim-test-v1", "--by", "sleeve",
                                   "--model-dir", str(model_dir)])
    assert out.exit_code == 2 and "no attribute group 'sleeve'" in out.output
