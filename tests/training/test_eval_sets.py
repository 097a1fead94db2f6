"""Every model is measured on the fixed evaluation set of the dataset it was trained for, identified by an
eval_set id; In-shop validation never sees a test item; the gate refuses numbers from different sets."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from enrich.cli import app
from model.manifest import read_manifest
from schemas.taxonomy import Taxonomy, load_taxonomy
from training.config import TINY, TrainConfig
from training.deepfashion import InShopRecords, inshop_partition, inshop_val_items, prepare_deepfashion
from training.eval_sets import (
    DATASET_TAXONOMY,
    EvalSetError,
    eval_config,
    eval_set_id,
    eval_set_mismatch,
    model_dataset,
    model_eval_config,
    parse_eval_set_id,
    same_eval_set,
)
from training.evaluate import evaluate_model, reevaluate_for_gate
from training.prepare import evaluation_set, prepare_data
from training.train import train

DF = Path(__file__).parent / "fixtures" / "deepfashion"
DF_CFG = replace(TINY, dataset="deepfashion", data_dir=DF, taxonomy="deepfashion", backbone="small_cnn",
                 pretrained=False, image_size=32, stage_steps=(2, 2, 2), batch_size=2, m_per_item=2)


def _train(out_dir: Path, version: str, **overrides) -> Path:
    return train(replace(DF_CFG, out_dir=out_dir, model_version=version, **overrides))


@pytest.fixture(scope="module")
def df_model(tmp_path_factory) -> Path:
    """A (barely) trained model for DeepFashion, on the fixture's real files."""
    return _train(tmp_path_factory.mktemp("df-models"), "df-eval")


def _relabelled_copy(model_dir: Path, dest: Path, *, version: str, taxonomy_name: str | None = None,
                     report: bool = True) -> Path:
    """A copy of a model directory under another version (and taxonomy name); without its report, it records no
    dataset at all (as models saved before the manifest named theirs)."""
    shutil.copytree(model_dir, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["model_version"] = version
    if taxonomy_name is not None:
        m["taxonomy"]["name"] = taxonomy_name
        m["taxonomy_sha256"] = Taxonomy.model_validate(m["taxonomy"]).sha256()
    (dest / "manifest.json").write_text(json.dumps(m))
    if not report:
        shutil.rmtree(dest / "report")
        m.pop("dataset", None)
        m.pop("eval_set", None)
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


# --- In-shop: a validation split apart from the test split -------------------------------------------

def _inshop_records(n_train: int = 50, n_test: int = 20) -> InShopRecords:
    rng = np.random.default_rng(1)
    images, items, part = [], [], []
    for i in range(n_train + n_test):
        photos = int(rng.integers(1, 5)) if i < n_train else 3
        for j in range(photos):
            images.append(f"img/id_{i:08d}/{j:02d}.jpg")
            items.append(f"id_{i:08d}")
            part.append("train" if i < n_train else "query" if j == 0 else "gallery")
    return InShopRecords(images, items, np.array(part), None)


def test_inshop_val_items_are_train_items_held_out_whole():
    rec = _inshop_records()
    part = inshop_partition(rec, seed=0)
    items = np.array(rec.item_ids)
    val = set(items[np.isin(part, ("val_query", "val_gallery"))])
    train = set(items[part == "train"])
    test = set(items[np.isin(part, ("query", "gallery"))])
    assert len(val) == 5  # a tenth of the 50 train items
    assert not val & train and not val & test and not train & test  # items, not photos, are split
    assert val | train == {k for k, p in zip(rec.item_ids, rec.partition, strict=True) if p == "train"}
    assert test == {k for k, p in zip(rec.item_ids, rec.partition, strict=True) if p != "train"}  # as published
    assert (part[rec.partition != "train"] == rec.partition[rec.partition != "train"]).all()
    for item in val:  # one query per held-out item, the rest gallery
        assert (part[items == item] == "val_query").sum() == 1
    # deterministic per seed; another seed holds out other items
    assert (inshop_partition(rec, seed=0) == part).all()
    assert inshop_val_items(rec.item_ids, rec.partition, seed=1) != val
    # tiny sets: never every train item; a single train item is not held out
    assert len(inshop_val_items(["a", "b"], np.array(["train", "train"]), 0)) == 1
    assert inshop_val_items(["a", "a"], np.array(["train", "train"]), 0) == set()


def test_deepfashion_validation_never_sees_a_test_item(tmp_path):
    root = tmp_path / "df"
    shutil.copytree(DF / "category", root / "category")
    rec = _inshop_records(30, 10)
    (root / "inshop" / "Eval").mkdir(parents=True)
    (root / "inshop" / "Eval" / "list_eval_partition.txt").write_text(
        f"{len(rec.images)}\nimage_name item_id evaluation_status\n"
        + "".join(f"{im} {k} {p}\n" for im, k, p in zip(rec.images, rec.item_ids, rec.partition, strict=True)))
    cfg = replace(DF_CFG, data_dir=root)
    data = prepare_deepfashion(cfg, load_taxonomy("deepfashion"))

    def shop_items(d):
        return set(d.item_ids[d.item_ids >= 0].tolist())

    val, test, train = shop_items(data.val.data), shop_items(data.test.data), shop_items(data.train)
    assert len(val) == 3 and len(test) == 10 and len(train) == 27
    assert not val & test and not val & train and not train & test
    assert data.val.query.sum() == 3  # one query per held-out item
    assert data.test.query.sum() == 10  # the published queries
    # the evaluation set alone (no training rows built) is exactly the training run's test split
    assert eval_set_id(cfg, data.taxonomy, evaluation_set(cfg, data.taxonomy).split) == \
        eval_set_id(cfg, data.taxonomy, data.test)


# --- eval_set ids -------------------------------------------------------------------------------------

def test_eval_set_ids_are_equal_on_the_same_set_and_differ_otherwise(tmp_path, fmnist_dir):
    tax = load_taxonomy("deepfashion")
    df_id = eval_set_id(DF_CFG, tax)
    assert parse_eval_set_id(df_id).dataset == "deepfashion" and parse_eval_set_id(df_id).split == "test"
    assert eval_set_id(DF_CFG, tax) == df_id == eval_set_id(DF_CFG)  # stable; taxonomy loaded by name
    assert eval_set_id(DF_CFG, tax, prepare_data(DF_CFG, tax).test) == df_id  # what training measures on
    assert eval_set_id(replace(DF_CFG, seed=7), tax) == df_id  # DeepFashion's test does not depend on the seed
    shutil.copytree(DF, tmp_path / "elsewhere")
    assert eval_set_id(replace(DF_CFG, data_dir=tmp_path / "elsewhere"), tax) == df_id  # another mount point
    no_inshop = tmp_path / "no-inshop"
    shutil.copytree(DF / "category", no_inshop / "category")
    assert eval_set_id(replace(DF_CFG, data_dir=no_inshop), tax) != df_id  # other rows
    v2 = Taxonomy.model_validate({**tax.model_dump(), "version": tax.version + 1})
    assert eval_set_id(DF_CFG, v2) != df_id  # labels mapped by another taxonomy

    fm = replace(TINY, data_dir=fmnist_dir, test_items=20)
    fm_id = eval_set_id(fm)
    assert fm_id.startswith("fmnist-shop:fashion-mnist:test:") and eval_set_id(fm) == fm_id
    for other in (replace(fm, seed=1), replace(fm, test_items=21), replace(fm, test_photos_per_item=2)):
        assert eval_set_id(other) != fm_id

    assert same_eval_set(df_id, df_id) and not same_eval_set(df_id, fm_id)
    assert not same_eval_set("", "") and not same_eval_set(None, df_id)
    assert eval_set_mismatch(df_id, df_id) is None
    assert "different datasets" in eval_set_mismatch(df_id, fm_id)
    assert "different taxonomies" in eval_set_mismatch(df_id, df_id.replace(":deepfashion:", ":shop:"))
    assert "different rows" in eval_set_mismatch(df_id, eval_set_id(DF_CFG, v2))
    assert "no evaluation set recorded for the active model" in eval_set_mismatch(df_id, "")


# --- evaluate: any dataset ----------------------------------------------------------------------------

def test_evaluate_a_deepfashion_model(df_model):
    result = evaluate_model(df_model, device="cpu", progress=False)
    stored = json.loads((df_model / "manifest.json").read_text())["metrics"]
    assert result.dataset == "deepfashion" and result.taxonomy == "deepfashion"
    assert "test/recall@1" in result.metrics and "test/top1" in result.metrics  # In-shop test + C&A test
    assert {k: v for k, v in stored.items() if k.startswith(("test/", "eval/"))} == pytest.approx(result.metrics)
    tax = load_taxonomy("deepfashion")
    assert result.eval_set == eval_set_id(DF_CFG, tax, prepare_data(DF_CFG, tax).test) == eval_set_id(df_model)


def test_evaluate_cli_on_a_deepfashion_model(df_model, tmp_path):
    out = tmp_path / "m.json"
    res = CliRunner().invoke(app, ["evaluate", str(df_model), "--device", "cpu", "--output", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert metrics == json.loads(out.read_text()) and "test/recall@1" in metrics and "test/top1" in metrics
    assert "evaluation set deepfashion:deepfashion:test:" in res.stderr


def test_a_custom_taxonomy_without_a_reader_is_a_clear_error(df_model, tmp_path):
    custom = _relabelled_copy(df_model, tmp_path / "custom", version="custom", taxonomy_name="shop-2025",
                              report=False)
    with pytest.raises(EvalSetError, match="taxonomy 'shop-2025' and records no dataset.*catalogue reader"):
        evaluate_model(custom, device="cpu", progress=False)
    res = CliRunner().invoke(app, ["evaluate", str(custom), "--device", "cpu"])
    assert res.exit_code == 1 and "catalogue reader" in res.output
    # a dataset recorded at training time that nothing here reads
    catalogue = _relabelled_copy(df_model, tmp_path / "catalogue", version="catalogue")
    report = json.loads((catalogue / "report" / "metrics.json").read_text())
    report["config"]["dataset"] = "shop-catalogue"
    (catalogue / "report" / "metrics.json").write_text(json.dumps(report))
    manifest = json.loads((catalogue / "manifest.json").read_text())
    manifest["dataset"] = "shop-catalogue"
    (catalogue / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EvalSetError, match="dataset 'shop-catalogue'.*no reader"):
        evaluate_model(catalogue, device="cpu", progress=False)
    # a custom taxonomy trained on DeepFashion (labels mapped by name) is measured on DeepFashion
    renamed = _relabelled_copy(df_model, tmp_path / "renamed", version="renamed", taxonomy_name="shop-2025")
    assert model_eval_config(renamed).dataset == "deepfashion"


# --- the evaluation set of a training configuration and of a saved model ---------------------------------

def test_a_job_measures_on_the_set_its_model_records(df_model, tmp_path):
    """A retraining job measures candidate and active model on ``eval_config`` of its training configuration:
    the very set the model it trains records, and the one its saved directory is measured on again."""
    job_set = eval_config(replace(DF_CFG, batch_size=7, stage_steps=(9, 9, 9), label_smoothing=0.1))
    assert job_set == eval_config(DF_CFG) and job_set.batch_size == TrainConfig().batch_size  # the rest: defaults
    assert model_eval_config(df_model) == job_set
    assert eval_set_id(job_set) == eval_set_id(df_model)  # the id its manifest records
    # a model without its manifest's id: the set is rebuilt from its training report alone
    bare = _relabelled_copy(df_model, tmp_path / "bare", version="bare")
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest.pop("eval_set")
    (bare / "manifest.json").write_text(json.dumps(manifest))
    assert eval_set_id(bare) == eval_set_id(df_model)
    # overrides win; a base for another dataset than the model's is refused
    assert model_eval_config(df_model, seed=3).seed == 3
    with pytest.raises(EvalSetError, match="trained for 'deepfashion'"):
        model_eval_config(df_model, replace(DF_CFG, dataset="fmnist-shop"))


def test_a_bundled_taxonomy_names_its_dataset(df_model, tiny_model_dir, tmp_path):
    """A model that records no dataset (no manifest field, no report) is taken for the dataset its bundled
    taxonomy was made for: the inverse of the taxonomy a retraining job gives each dataset."""
    for model_dir, dataset in ((df_model, "deepfashion"), (tiny_model_dir, "fmnist-shop")):
        old = _relabelled_copy(model_dir, tmp_path / dataset, version=f"old-{dataset}", report=False)
        assert read_manifest(old).taxonomy.name == DATASET_TAXONOMY[dataset]
        assert model_dataset(old) == dataset == model_eval_config(old).dataset


# --- the gate: one set, or no comparison --------------------------------------------------------------

def test_reevaluation_measures_both_models_on_the_candidates_set(df_model, tmp_path):
    twin = _relabelled_copy(df_model, tmp_path / "twin", version="df-twin")
    cand, act = reevaluate_for_gate(twin, df_model, device="cpu")
    assert same_eval_set(cand.eval_set, act.eval_set) and cand.metrics == pytest.approx(act.metrics)


def test_reevaluation_refuses_models_for_different_datasets_or_taxonomies(df_model, tiny_model_dir, tmp_path):
    with pytest.raises(EvalSetError, match=r"different datasets \(deepfashion vs fmnist-shop\)"):
        reevaluate_for_gate(df_model, tiny_model_dir, device="cpu")
    renamed = _relabelled_copy(df_model, tmp_path / "renamed", version="renamed", taxonomy_name="shop-2025")
    with pytest.raises(EvalSetError, match="different taxonomies"):
        reevaluate_for_gate(renamed, df_model, device="cpu")


@pytest.mark.integration
def test_promote_reevaluate_refuses_a_model_for_another_dataset(db, pg_url, tiny_model_dir, df_model, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["promote", str(df_model), "--no-backfill", "--database-url", pg_url])
    assert res.exit_code == 0, res.output  # first model: nothing to compare with
    twin = _relabelled_copy(df_model, tmp_path / "twin", version="df-twin")
    res = runner.invoke(app, ["promote", str(twin), "--reevaluate", "--no-backfill", "--database-url", pg_url])
    assert res.exit_code == 0 and "promoted df-twin" in res.output, res.output  # same set, same numbers
    res = runner.invoke(app, ["promote", str(tiny_model_dir), "--reevaluate", "--no-backfill",
                              "--database-url", pg_url])
    assert res.exit_code == 1 and "refused tiny-test" in res.output and "different datasets" in res.output
    assert db.execute("SELECT model_version FROM models WHERE status = 'active'").fetchall() == [("df-twin",)]
