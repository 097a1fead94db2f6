"""Human corrections as training rows: labels from Postgres, photos through the worker's guarded fetcher."""
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from training.corrections import correction_labels, corrections_to_images
from training.data import LabelledImages
from training.losses import MISSING
from training.prepare import add_training_rows


@dataclass
class Label:  # the fields of training.corrections.CorrectionLabel that matter here
    listing_id: str
    group: str
    value: str
    index: int | None
    images: list[str] = field(default_factory=list)
    corrected_at: datetime = datetime(2026, 1, 1, tzinfo=UTC)


def _photo(rgb, size=40) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def test_one_row_per_listing_with_its_corrected_groups_only(fmnist_taxonomy):
    photos = {"a.png": _photo((200, 10, 10)), "b2.png": _photo((10, 10, 200))}

    def load(uri):
        if uri not in photos:
            raise OSError(f"{uri} unreachable")
        return photos[uri]

    labels = [Label("a", "category", "Coat", 4, ["a.png"]), Label("a", "colour", "red", 2, ["a.png"]),
              Label("b", "colour", "blue", 4, ["b1.png", "b2.png"]),  # first photo fails: the next one is used
              Label("c", "category", "Bag", 8, ["c.png"])]  # no photo loads: skipped
    rows = corrections_to_images(labels, fmnist_taxonomy, load, size=28)
    assert len(rows) == 2 and rows.images.shape == (2, 28, 28, 3) and rows.images.dtype == np.uint8
    assert rows.category.tolist() == [4, MISSING]  # b has no category correction
    assert rows.groups["colour"].tolist() == [2, 4]
    assert (rows.item_ids == MISSING).all()
    assert tuple(rows.images[1, 5, 5]) == (10, 10, 200)  # b's second photo


def test_labels_without_taxonomy_index_are_refused(fmnist_taxonomy):
    with pytest.raises(ValueError, match="taxonomy index"):
        corrections_to_images([Label("a", "category", "Coat", None, ["a.png"])], fmnist_taxonomy,
                              lambda uri: _photo((0, 0, 0)), size=28)


def _rows(n, size, category=0):
    return LabelledImages(np.zeros((n, size, size, 3), np.uint8), np.full(n, category, np.int64),
                          np.arange(n, dtype=np.int64), {"colour": np.zeros(n, np.int64)})


def test_added_rows_are_resized_and_repeated():
    merged = add_training_rows(_rows(5, 28), _rows(2, 40, category=7), repeats=3)
    assert len(merged) == 11 and merged.images.shape[1:] == (28, 28, 3)
    assert (merged.category == 7).sum() == 6


def test_added_rows_join_file_based_datasets_as_photos_the_loader_passes_through(tmp_path):
    from training.deepfashion import load_cropped

    Image.new("RGB", (30, 20), (0, 200, 0)).save(tmp_path / "x.jpg")
    refs = np.empty(1, dtype=object)
    refs[0] = (str(tmp_path / "x.jpg"), None)
    files = LabelledImages(refs, np.zeros(1, np.int64), np.zeros(1, np.int64), {"colour": np.zeros(1, np.int64)})
    extra = _rows(2, 40, category=7)
    extra.images[1] = 255
    merged = add_training_rows(files, extra, repeats=2)
    assert len(merged) == 5 and merged.images.dtype == object
    assert merged.category.tolist() == [0, 7, 7, 7, 7]
    assert load_cropped(merged.images[0]).shape == (20, 30, 3)  # the file, decoded
    assert load_cropped(merged.images[2]).shape == (40, 40, 3) and int(load_cropped(merged.images[2]).min()) == 255
    assert merged.fingerprint() != add_training_rows(files, _rows(2, 40, category=7), repeats=2).fingerprint()


def _insert_correction(db, listing_id, images, group="category", value="Coat"):
    db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash) VALUES (%s, 's', %s::jsonb, 'h')",
               (listing_id, json.dumps({"images": images})))
    db.execute("INSERT INTO corrections (event_id, listing_id, tag_group, new_value, corrected_by, corrected_at)"
               " VALUES (%s, %s, %s, %s, 'reviewer', now())", (f"e-{listing_id}", listing_id, group, value))


@pytest.mark.integration
def test_corrected_photos_load_under_the_settings_passed_in(db, fmnist_taxonomy, tmp_path):
    from core.config import Settings
    from core.images import load_image

    photo = tmp_path / "coat.png"
    _photo((215, 30, 35), size=64).save(photo)
    _insert_correction(db, "fixed-1", [str(photo)])
    labels = correction_labels(db, fmnist_taxonomy)
    allowed = Settings(allow_local_paths=True)
    rows = corrections_to_images(labels, fmnist_taxonomy, lambda uri: load_image(uri, allowed), size=28)
    assert len(rows) == 1 and rows.category.tolist() == [4]
    refused = Settings(allow_local_paths=False)  # the worker's default: no plain file paths
    assert len(corrections_to_images(labels, fmnist_taxonomy, lambda uri: load_image(uri, refused), size=28)) == 0


@pytest.mark.integration
def test_train_cli_with_corrections_from_postgres(db, pg_url, fmnist_dir, tiny_model_dir, tmp_path, monkeypatch):
    from enrich.cli import app

    photo = tmp_path / "coat.png"
    _photo((215, 30, 35), size=64).save(photo)
    for lid, images in (("fixed-1", [str(photo)]), ("fixed-2", [str(tmp_path / "missing.png")])):
        _insert_correction(db, lid, images)
    # the command reads its settings from the environment, as a process start does
    monkeypatch.setenv("ENRICH_DATABASE_URL", pg_url)
    monkeypatch.setenv("ENRICH_ALLOW_LOCAL_PATHS", "true")
    res = CliRunner().invoke(app, ["train", "--preset", "tiny", "--with-corrections", "--device", "cpu",
                                   "--data-dir", str(fmnist_dir), "--out-dir", str(tmp_path / "models"),
                                   "--model-version", "with-corrections"])
    assert res.exit_code == 0, res.output
    assert "2 corrected label(s)" in res.output
    model_dir = tmp_path / "models" / "with-corrections"
    report = json.loads((model_dir / "report" / "metrics.json").read_text())
    assert report["config"]["extra_training_rows"] == 1  # fixed-2's photo does not exist
    # the same preset and data without corrections trains on different rows
    fingerprint = json.loads((model_dir / "manifest.json").read_text())["data_fingerprint"]
    assert fingerprint != json.loads((tiny_model_dir / "manifest.json").read_text())["data_fingerprint"]
