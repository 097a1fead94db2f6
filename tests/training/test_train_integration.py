"""A real, tiny training run on real Fashion-MNIST images: the loss must fall."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from training.config import TINY
from training.train import train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("amp", [True, False], ids=["amp", "fp32"])  # amp: bf16 where this CPU has it
def test_tiny_training_loss_falls(tmp_path, fmnist_dir, amp):
    from safetensors.torch import load_file

    cfg = replace(TINY, out_dir=tmp_path, data_dir=fmnist_dir, model_version="it", backbone="small_cnn",
                  pretrained=False, image_size=28, stage_steps=(0, 40, 0), batch_size=32, train_items=2000,
                  lr_classification=2e-3, augment="light", amp=amp)
    out = train(cfg)
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}  # what the worker loads
    report = json.loads((out / "report" / "metrics.json").read_text())
    losses = [h["total"] for h in report["history"] if "total" in h]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])
    assert (out / "report" / "summary.md").is_file() and (out / "report" / "confusion.png").stat().st_size > 0
    assert report["test"]["test/top1"] > 0.3  # well above chance (0.1) after 40 steps


def test_grey_photos_teach_the_published_images(tmp_path, fmnist_dir):
    """A model trained on tinted renders only does not read the grey Fashion-MNIST images the published
    figures use; with each item's grey image added (colour masked), it does — and colour is still learnt."""
    def metrics(grey: bool) -> dict:
        cfg = replace(TINY, out_dir=tmp_path, data_dir=fmnist_dir, model_version=f"grey-{grey}", backbone="small_cnn",
                      pretrained=False, image_size=28, stage_steps=(0, 60, 0), batch_size=32, train_items=2000,
                      test_items=1000, lr_classification=2e-3, augment="light", grey_photos=grey)
        return json.loads((train(cfg) / "manifest.json").read_text())["metrics"]

    renders_only, with_grey = metrics(False), metrics(True)
    assert with_grey["test_grey/top1"] > 0.35 and with_grey["test_grey/top1"] > renders_only["test_grey/top1"] + 0.2
    assert with_grey["test/attr/exact_match"] > 0.25  # colour is learnt: 12 colours, chance is 0.08


def test_staged_stages_train_the_right_parts(tmp_path, fmnist_dir):
    """Stage 1 must not move the classification heads; stage 2 must not move the retrieval head; the joint
    stage moves the backbone at ``joint_trunk_lr`` times the heads' rate (0 here: not at all)."""
    import torch

    from model.network import build_model
    from schemas.taxonomy import load_taxonomy
    from training.prepare import prepare_data
    from training.train import build_criterion, run_stage, seed_everything

    cfg = replace(TINY, data_dir=fmnist_dir, backbone="small_cnn", pretrained=False, image_size=28, joint_trunk_lr=0.0)
    tax = load_taxonomy(cfg.taxonomy)
    data = prepare_data(cfg, tax)
    model = build_model("small_cnn", tax, pretrained=False)
    crit = build_criterion(data.train, tax, cfg)
    stages = {s.name: s for s in cfg.stages()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_stage(model, stages["1-retrieval"], data, crit, cfg, torch.device("cpu"), seed_everything(0), None, [])
    after = model.state_dict()
    assert torch.equal(before["category_head.weight"], after["category_head.weight"])
    assert not torch.equal(before["retrieval_head.3.weight"], after["retrieval_head.3.weight"])
    before = {k: v.clone() for k, v in after.items()}
    run_stage(model, stages["2-classification"], data, crit, cfg, torch.device("cpu"), seed_everything(0), None, [])
    after = model.state_dict()
    assert torch.equal(before["retrieval_head.3.weight"], after["retrieval_head.3.weight"])
    assert not torch.equal(before["category_head.weight"], after["category_head.weight"])
    trunk = [k for k, _ in model.backbone.named_parameters()]
    assert any(not torch.equal(before[f"backbone.{k}"], after[f"backbone.{k}"]) for k in trunk)  # stage 2 moved it
    before = {k: v.clone() for k, v in after.items()}
    run_stage(model, stages["3-joint"], data, crit, cfg, torch.device("cpu"), seed_everything(0), None, [])
    after = model.state_dict()
    assert all(torch.equal(before[f"backbone.{k}"], after[f"backbone.{k}"]) for k in trunk)
    assert not torch.equal(before["retrieval_head.3.weight"], after["retrieval_head.3.weight"])
    assert not torch.equal(before["category_head.weight"], after["category_head.weight"])


def test_deepfashion_fixture_trains_end_to_end(tmp_path):
    """The DeepFashion path (Category & Attribute + In-shop, real file formats, real JPEGs) runs every stage."""
    from pathlib import Path

    from model.inference import load_predictor

    root = Path(__file__).parent / "fixtures" / "deepfashion"
    cfg = replace(TINY, dataset="deepfashion", data_dir=root, taxonomy="deepfashion", backbone="small_cnn",
                  pretrained=False, image_size=32, stage_steps=(2, 2, 2), batch_size=2, m_per_item=2,
                  out_dir=tmp_path, model_version="df-smoke")
    out = train(cfg)
    pred = load_predictor(out, device="cpu")
    assert pred.manifest.taxonomy.name == "deepfashion" and len(pred.manifest.taxonomy.categories) == 50
    report = json.loads((out / "report" / "metrics.json").read_text())
    stages = {h["stage"] for h in report["history"] if "total" in h}
    assert stages == {"1-retrieval", "2-classification", "3-joint"}
    assert "test/recall@1" in report["test"]  # In-shop query vs gallery was evaluated


def test_deepfashion_trains_with_corrections_added(tmp_path):
    """Human corrections (in-memory photos) join a file-based DeepFashion training split."""
    from pathlib import Path

    from schemas.taxonomy import load_taxonomy
    from training.data import LabelledImages
    from training.losses import MISSING

    tax = load_taxonomy("deepfashion")
    n = 3
    extra = LabelledImages(np.full((n, 32, 32, 3), 180, np.uint8), np.array([0, 1, MISSING]),
                           np.full(n, MISSING, np.int64),
                           {g.name: (np.full(n, MISSING, np.int64) if g.exclusive
                                     else np.zeros((n, len(g.values)), np.float32)) for g in tax.attribute_groups},
                           {g.name: np.zeros(n, bool) for g in tax.attribute_groups if not g.exclusive})
    root = Path(__file__).parent / "fixtures" / "deepfashion"
    cfg = replace(TINY, dataset="deepfashion", data_dir=root, taxonomy="deepfashion", backbone="small_cnn",
                  pretrained=False, image_size=32, stage_steps=(2, 2, 2), batch_size=2, m_per_item=2,
                  out_dir=tmp_path, model_version="df-corr", correction_repeats=2)
    out = train(cfg, extra_train=extra)
    report = json.loads((out / "report" / "metrics.json").read_text())
    assert report["config"]["extra_training_rows"] == n
    assert {h["stage"] for h in report["history"] if "total" in h} == {"1-retrieval", "2-classification", "3-joint"}


def test_init_from_starts_with_a_saved_models_weights(tmp_path, fmnist_dir):
    from safetensors.torch import load_file

    base = replace(TINY, out_dir=tmp_path, data_dir=fmnist_dir, backbone="small_cnn", pretrained=False, image_size=28)
    first = train(replace(base, model_version="first"))
    # no training steps at all: the saved weights must be exactly the ones it started from
    again = train(replace(base, model_version="again", init_from=first, stage_steps=(0, 0, 0)))
    a, b = load_file(str(first / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = train(replace(base, model_version="fresh", stage_steps=(0, 0, 0)))
    fresh_weights = load_file(str(fresh / "model.safetensors"))
    assert not torch.equal(fresh_weights["category_head.weight"], a["category_head.weight"])
    with pytest.raises(RuntimeError, match="cannot start a efficientnet_lite0 model"):
        train(replace(base, backbone="efficientnet_lite0", model_version="x", init_from=first))
