"""Losses that resist wrong labels (training.losses.LABEL_LOSSES): each keeps a confidently wrong label from
dominating the batch, the plain one does not, and a catalogue retraining uses the noise-robust one."""
from __future__ import annotations

import pytest
import torch

from training.losses import GCE_Q, MISSING, SMALL_LOSS_KEEP, MultitaskLoss, masked_group_ce


def _batch():
    """Eight rows the model is sure of; row 0's label says otherwise (a seller's mistake)."""
    logits = torch.full((8, 4), -4.0)
    logits[:, 1] = 4.0
    target = torch.ones(8, dtype=torch.int64)
    target[0] = 3
    return logits.requires_grad_(True), target


def _pull_of_wrong_row(label_loss: str) -> float:
    """How hard the wrong label pulls the logits: the size of its row's gradient."""
    logits, target = _batch()
    masked_group_ce(logits, target, label_loss=label_loss).backward()
    g = logits.grad.abs().sum(dim=1)
    assert float(g[1:].sum()) < 1e-2  # the rows the model already gets right pull hardly at all
    return float(g[0])


@pytest.mark.parametrize("label_loss", ["gce", "bootstrap", "small_loss"])
def test_robust_losses_give_the_wrong_label_less_pull(label_loss):
    assert _pull_of_wrong_row(label_loss) < 0.85 * _pull_of_wrong_row("ce")


def test_gce_is_bounded_where_cross_entropy_is_not():
    logits, target = _batch()
    logits = logits.detach() * 10  # ever more sure of the other value
    assert masked_group_ce(logits[:1], target[:1], label_loss="ce") > 50
    assert masked_group_ce(logits[:1], target[:1], label_loss="gce") <= 1 / GCE_Q + 1e-6


def test_small_loss_trains_on_the_smallest_losses_of_the_labelled_rows():
    logits, target = _batch()
    logits = logits.detach()
    target[5] = MISSING  # unlabelled rows are neither kept nor counted
    labelled = (target != MISSING).nonzero().squeeze(1)
    per_row = torch.nn.functional.cross_entropy(logits[labelled], target[labelled], reduction="none")
    keep = int(torch.ceil(torch.tensor(len(labelled) * SMALL_LOSS_KEEP)))
    expected = per_row.sort().values[:keep].mean()
    assert torch.isclose(masked_group_ce(logits, target, label_loss="small_loss"), expected)
    assert masked_group_ce(logits, target, label_loss="small_loss") < masked_group_ce(logits, target)


def test_an_unknown_label_loss_is_refused():
    with pytest.raises(ValueError, match="unknown label loss"):
        MultitaskLoss(label_loss="focal")


def test_catalogue_retraining_uses_the_noise_robust_loss(tmp_path):
    from core.config import Settings
    from training.config import CATALOGUE_LABEL_LOSS
    from training.jobs import job_config

    catalogue = Settings(data_dir=tmp_path, retrain_dataset="catalogue", retrain_catalogue="/exports/shop.jsonl",
                         retrain_taxonomy="fashion-mnist")
    assert job_config({"preset": "quick"}, catalogue, job_id=1).label_loss == CATALOGUE_LABEL_LOSS != "ce"
    # curated labels (FMNIST-shop, DeepFashion) keep the plain loss
    assert job_config({"preset": "quick"}, Settings(data_dir=tmp_path), job_id=2).label_loss == "ce"


def test_retraining_counts_each_correction_sixteen_times(tmp_path):
    """What the corrections benchmark chose: a corrected listing is 16 rows of the training set, not 4."""
    import numpy as np

    from core.config import Settings
    from training.data import LabelledImages
    from training.jobs import job_config
    from training.prepare import add_training_rows

    cfg = job_config({"preset": "quick"}, Settings(data_dir=tmp_path), job_id=3)
    assert cfg.correction_repeats == 16
    base = LabelledImages(np.zeros((10, 8, 8, 3), np.uint8), np.zeros(10, np.int64), np.zeros(10, np.int64))
    fix = LabelledImages(np.ones((1, 8, 8, 3), np.uint8), np.ones(1, np.int64), np.full(1, -1, np.int64))
    assert (add_training_rows(base, fix, cfg.correction_repeats).category == 1).sum() == 16


def test_enrich_train_on_a_catalogue_defaults_to_the_noise_robust_loss(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import training.train
    from enrich.cli import app
    from training.config import CATALOGUE_LABEL_LOSS

    seen = {}

    def fake_train(cfg, extra=None, settings=None):  # the command's configuration is under test, not training
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(training.train, "train", fake_train)
    monkeypatch.setenv("ENRICH_DATA_DIR", str(tmp_path))
    CliRunner().invoke(app, ["train", "--preset", "tiny", "--catalogue", str(tmp_path / "x.jsonl")])
    assert seen["cfg"].label_loss == CATALOGUE_LABEL_LOSS
    CliRunner().invoke(app, ["train", "--preset", "tiny", "--catalogue", str(tmp_path / "x.jsonl"),
                             "--label-loss", "ce"])
    assert seen["cfg"].label_loss == "ce"
    res = CliRunner().invoke(app, ["train", "--preset", "tiny", "--label-loss", "focal"])
    assert res.exit_code != 0 and "unknown label loss" in res.output
