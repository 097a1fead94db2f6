"""Weak labels from listing text: the catalogue reader makes them only where the text
names one value and no seller/corrected label exists, the loss weighs them by TrainConfig.weak_label_weight,
and `enrich train --dataset catalogue` trains with them."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_catalogue import TAXONOMY, _listings, _load, _write_jsonl
from typer.testing import CliRunner

from model.text import parse_vocabulary
from schemas.taxonomy import Taxonomy
from training.catalogue import (
    CatalogueRow,
    rows_from_jsonl,
    rows_to_images,
    training_vocabulary,
    weak_labels,
)
from training.config import TINY
from training.data import TensorBatches
from training.losses import MISSING, MultitaskLoss, masked_group_ce

VOCAB = {"taxonomy": "shop-2026",
         "groups": {"category": {"tee": ["tee", "t-shirt"], "jeans": ["jeans"], "hoodie": ["hoodie"]},
                    "colour": {"red": ["red"], "green": ["green"], "blue": ["blue"]},
                    "style": {"casual": ["casual"], "formal": ["formal"]}}}


@pytest.fixture()
def taxonomy():
    return Taxonomy.model_validate(TAXONOMY)


@pytest.fixture()
def vocabulary(taxonomy):
    return parse_vocabulary(VOCAB, taxonomy)


def _row(photo, text, **seller):
    return CatalogueRow("x", [photo], dict(seller), {}, text)


def test_weak_labels_only_where_the_text_names_one_value(tmp_path, taxonomy, vocabulary):
    events, _ = _listings(tmp_path)
    photo = events[0].images[0]

    def wl(row):
        return weak_labels(row, taxonomy, vocabulary)

    assert wl(_row(photo, "Red tee, not blue", category="tee")) == {"colour": "red"}  # seller's category kept
    assert wl(_row(photo, "red hoodie")) == {"category": "hoodie", "colour": "red"}
    assert wl(_row(photo, "red and blue")) == {}  # two values: masked
    assert wl(_row(photo, "not red")) == {}  # negated
    assert wl(_row(photo, "red top, not red")) == {}  # named and negated
    assert wl(_row(photo, "")) == {} and wl(_row(photo, "vintage top")) == {}  # the text says nothing
    assert wl(_row(photo, "blue tee", colour="green")) == {"category": "tee"}  # never over a seller label
    assert wl(_row(photo, "blue tee", colour="purple")) == {"category": "tee"}  # ... even an unknown one
    corrected = CatalogueRow("x", [photo], {}, {"colour": "green"}, "blue")
    assert wl(corrected) == {}  # nor over a correction
    assert "style" not in wl(_row(photo, "casual"))  # non-exclusive groups: no weak labels

    rows = [_row(photo, "Red tee", category="tee"),  # weak colour
            _row(photo, "blue jeans", category="jeans", colour="green"),  # seller colour, text ignored
            _row(photo, "red or blue", category="hoodie"),  # masked
            _row(photo, "green hoodie")]  # weak category and colour (no seller label at all: still a row)
    data, _, n = rows_to_images(rows, taxonomy, _load, 16, 1, vocabulary=vocabulary, weak_weight=0.3)
    assert n == 4
    assert data.groups["colour"].tolist() == [0, 1, MISSING, 1]
    assert data.category.tolist() == [0, 1, 2, 2]
    assert np.allclose(data.weights["colour"], [0.3, 1, 1, 0.3])
    assert np.allclose(data.weights["category"], [1, 1, 1, 0.3])
    assert "style" not in data.weights and not data.present["style"].any()
    # off (no vocabulary, or weight 0): no weights, the text-only listing skipped
    for kw in ({}, {"vocabulary": vocabulary, "weak_weight": 0.0}):
        plain, _, n = rows_to_images(rows, taxonomy, _load, 16, 1, **kw)
        assert n == 3 and plain.weights == {} and plain.groups["colour"].tolist() == [MISSING, 1, MISSING]
    # subset / concat / batches carry the weights (ones for a set without them)
    both = data.concat(plain)
    assert np.allclose(both.weights["colour"], [0.3, 1, 1, 0.3, 1, 1, 1])
    assert np.allclose(data.subset(np.array([3, 0])).weights["category"], [0.3, 1])
    batch = TensorBatches(data, lambda x: x.float(), torch.device("cpu")).batch([3, 1])
    assert torch.allclose(batch["weight/colour"], torch.tensor([0.3, 1.0]))
    assert data.fingerprint() != replace(data, weights={}).fingerprint()


def test_weighted_loss_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    target = torch.tensor([0, 2, MISSING, 1])
    rw = torch.tensor([1.0, 0.3, 0.3, 1.0])  # row 1 weak, row 2 weak but masked (a MISSING target)
    nll = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
    # each present row's loss × its weight, over the number of rows that have the group
    expected = (nll[0] + 0.3 * nll[1] + nll[3]) / 3
    assert torch.allclose(masked_group_ce(logits, target, row_weight=rw), expected)
    cw = torch.tensor([1.0, 2.0, 0.5])  # with class weights: both scale a row, the normaliser has cw only
    expected = (1.0 * nll[0] + 0.5 * 0.3 * nll[1] + 2.0 * nll[3]) / (1.0 + 0.5 + 2.0)
    assert torch.allclose(masked_group_ce(logits, target, cw, row_weight=rw), expected)
    # all-ones weights (and none) give the plain loss exactly
    plain = masked_group_ce(logits, target, cw)
    assert torch.equal(masked_group_ce(logits, target, cw, row_weight=torch.ones(4)), plain)
    assert torch.allclose(plain, (cw[0] * nll[0] + cw[2] * nll[1] + cw[1] * nll[3]) / (cw[0] + cw[2] + cw[1]))
    # MultitaskLoss reads weight/<group> from the batch
    out = type("Out", (), {"category": logits, "groups": {"colour": logits}, "embedding": torch.zeros(4, 2)})()
    crit = MultitaskLoss(exclusive={"colour": True})
    batch = {"category": target, "group/colour": target}
    _, parts = crit.classification(out, {**batch, "weight/colour": rw})
    assert torch.allclose(parts["attr/colour"], (nll[0] + 0.3 * nll[1] + nll[3]) / 3)
    assert torch.equal(parts["cat"], crit.classification(out, batch)[1]["cat"])


def test_training_vocabulary_lookup(tmp_path, taxonomy):
    for folder in ("none", "beside"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "shop-2026.json").write_text(json.dumps(TAXONOMY))
    (tmp_path / "beside" / "shop-2026.vocab.json").write_text(json.dumps(VOCAB))
    assert training_vocabulary(replace(TINY, taxonomy=str(tmp_path / "none" / "shop-2026.json")), taxonomy) is None
    cfg = replace(TINY, taxonomy=str(tmp_path / "beside" / "shop-2026.json"))
    assert training_vocabulary(cfg, taxonomy) is not None
    assert training_vocabulary(replace(cfg, weak_label_weight=0.0), taxonomy) is None


def test_train_with_weak_labels(tmp_path, monkeypatch):
    from enrich.cli import app
    from training.train import build_criterion

    events, corrected = _listings(tmp_path)
    colours = ["red", "green", "blue"]
    for i, ev in enumerate(events):  # every other listing: the colour only in the title
        if i % 2 and "colour" in ev.attributes:
            events[i] = ev.model_copy(update={"attributes": {k: v for k, v in ev.attributes.items() if k != "colour"},
                                              "title": f"{colours[i % 3]} {ev.category}, not {colours[(i + 1) % 3]}"})
    export = _write_jsonl(tmp_path / "export.jsonl", events, corrected)
    tax = tmp_path / "shop-2026.json"
    tax.write_text(json.dumps(TAXONOMY))
    (tmp_path / "shop-2026.vocab.json").write_text(json.dumps(VOCAB))
    taxonomy = Taxonomy.model_validate(TAXONOMY)
    rows = rows_from_jsonl(export)
    assert rows[3].text == "red tee, not green" and "colour" not in rows[3].labels
    data, _, _ = rows_to_images(rows, taxonomy, _load, 16, 1, vocabulary=parse_vocabulary(VOCAB, taxonomy),
                                weak_weight=0.3)
    weak = data.weights["colour"] < 1
    assert weak.sum() > 10 and (data.groups["colour"][weak] >= 0).all()
    # the per-task weights' label counts take weak labels at their weight
    on = build_criterion(data, taxonomy, replace(TINY, group_loss_weights={}, task_weights=True))
    assert on.group_task_weight["colour"] == 1.0

    monkeypatch.setenv("ENRICH_ALLOW_LOCAL_PATHS", "true")
    res = CliRunner().invoke(app, ["train", "--preset", "tiny", "--catalogue", str(export), "--taxonomy", str(tax),
                                   "--device", "cpu", "--out-dir", str(tmp_path / "models"), "--model-version", "weak",
                                   "--no-amp", "--image-size", "32", "--weak-label-weight", "0.3"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert "test/map/colour" in out["metrics"]
    report = json.loads((tmp_path / "models" / "weak" / "report" / "metrics.json").read_text())
    assert report["config"]["weak_label_weight"] == 0.3
