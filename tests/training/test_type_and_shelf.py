"""The type output, attribute groups that do not apply to a category (masked in training and scoring), and the
shelf embedding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.inference import Predictions, shelf_embedding
from model.network import ModelOutput, build_model, joint_category
from schemas.taxonomy import load_taxonomy
from training.data import LabelledImages, mask_not_applicable
from training.deepfashion import category_attribute_labels, read_category_attribute
from training.losses import MISSING, MultitaskLoss
from training.metrics import retrieval_metrics
from training.scores import exact_match

DF = Path(__file__).parent / "fixtures" / "deepfashion"


def test_the_model_has_a_type_head_sized_by_the_taxonomy(mixed_taxonomy):
    model = build_model("small_cnn", mixed_taxonomy, pretrained=False, embedding_dim=16).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.type.shape == (2, len(mixed_taxonomy.types))
    assert model.category_type.tolist() == [0, 1, 0]  # tee top, jeans bottom, shirt top
    old = build_model("small_cnn", mixed_taxonomy, pretrained=False, embedding_dim=16, type_head=False).eval()
    assert old(torch.randn(2, 3, 32, 32)).type is None


def test_joint_category_makes_type_and_category_agree():
    category_type = torch.tensor([0, 1, 0])  # tee top, jeans bottom, shirt top
    cat = torch.tensor([[0.40, 0.35, 0.25]])
    # the type head is sure it is a bottom: the jeans win over the slightly likelier tee
    joint, types = joint_category(cat, torch.tensor([[0.1, 0.9]]), category_type)
    assert joint.argmax(1).item() == 1 and types.argmax(1).item() == 1
    torch.testing.assert_close(joint.sum(1), torch.ones(1))
    torch.testing.assert_close(types, torch.stack([joint[:, [0, 2]].sum(1), joint[:, 1]], 1))
    # without a type head: the category probabilities unchanged, the type their marginal
    joint, types = joint_category(cat, None, category_type)
    torch.testing.assert_close(joint, cat)
    torch.testing.assert_close(types, torch.tensor([[0.65, 0.35]]))


def test_type_loss_learns_the_labelled_categorys_type_and_skips_unlabelled_rows():
    category_type = torch.tensor([0, 1, 0])
    loss = MultitaskLoss(category_type=category_type)
    type_logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-3.0, 3.0]])
    out = ModelOutput(category=torch.zeros(3, 3), groups={}, embedding=F.normalize(torch.randn(3, 4), dim=1),
                      type=type_logits)
    batch = {"category": torch.tensor([1, MISSING, 2]), "item_id": torch.tensor([0, 1, 2])}
    _, parts = loss(out, batch, use_cls=True, use_ret=False)
    # rows 0 (jeans → bottom) and 2 (shirt → top); row 1 has no category, so no type either
    expected = F.cross_entropy(type_logits[[0, 2]], torch.tensor([1, 0]))
    torch.testing.assert_close(parts["type"], expected)
    _, without = MultitaskLoss()(out, batch, use_cls=True, use_ret=False)
    assert "type" not in without


def test_groups_that_do_not_apply_are_masked_in_training_data():
    tax = load_taxonomy("deepfashion")
    data, _ = category_attribute_labels(read_category_attribute(DF / "category"), tax, DF / "category")
    names = [tax.category_names[i] for i in data.category]
    jeans, dress = names.index("Jeans"), names.index("Dress")
    sleeve = data.groups["sleeve"].copy()
    sleeve[jeans] = 0  # a (wrong) sleeve label on the jeans
    data.groups["sleeve"] = sleeve
    data.category = data.category.copy()
    data.category[0] = MISSING  # a row without a category keeps what it has
    masked = mask_not_applicable(data, tax)
    assert masked.groups["sleeve"][jeans] == MISSING and masked.groups["length"][jeans] == MISSING
    assert masked.groups["fabric"][jeans] == data.groups["fabric"][jeans] >= 0  # fabric applies to jeans
    assert masked.groups["sleeve"][dress] == data.groups["sleeve"][dress] >= 0
    assert masked.groups["sleeve"][0] == data.groups["sleeve"][0] >= 0
    # an all-applicable taxonomy: nothing to do
    fm = load_taxonomy("fashion-mnist")
    plain = LabelledImages(np.zeros((2, 2, 2, 3), np.uint8), np.array([0, 1]), np.array([0, 1]),
                           {"colour": np.array([1, 2])})
    assert mask_not_applicable(plain, fm) is plain


def test_exact_match_needs_category_type_and_every_labelled_group(mixed_taxonomy):
    tax = mixed_taxonomy
    data = LabelledImages(np.zeros((3, 2, 2, 3), np.uint8), np.array([0, 1, 2]), np.full(3, MISSING),
                          {"colour": np.array([0, 1, MISSING]), "sleeve": np.array([1, MISSING, 2]),
                           "style": np.array([[1, 0, 0, 0]] * 3, np.float32)},
                          {"style": np.array([True, False, True])})
    eye = np.eye(3)
    preds = Predictions(
        category=eye[[0, 1, 2]], type=np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]),
        groups={"colour": np.eye(2)[[0, 1, 1]], "sleeve": eye[[1, 0, 2]],
                "style": np.array([[0.9, 0.1, 0.1, 0.1], [0.9, 0.9, 0.9, 0.9], [0.9, 0.1, 0.1, 0.1]])},
        embedding=np.zeros((3, 4), np.float32))
    # row 0: all right; row 1: right where labelled (sleeve and style unlabelled); row 2: the type is wrong
    out = exact_match(tax, preds, data)
    assert out["exact_match"] == 2 / 3 and out["type/accuracy"] == 2 / 3


def test_shelf_embedding_adds_the_category_agreement_to_the_image_similarity():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(4, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    cat = np.array([0, 0, 1, 2])
    assert shelf_embedding(e, cat, 3, 0.0) is e
    s = shelf_embedding(e, cat, 3, 0.3)
    assert s.shape == (4, 11)
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0, rtol=1e-6)
    same = (cat[:, None] == cat[None, :]).astype(np.float32)
    np.testing.assert_allclose(s @ s.T, 0.7 * (e @ e.T) + 0.3 * same, rtol=1e-5, atol=1e-6)


def test_retrieval_reports_how_many_of_the_top_five_share_the_category():
    # 1 query; gallery: its item's other photo first, then 4 more, 2 of them in its category
    g = np.eye(6, dtype=np.float32)[:5] + np.linspace(1.0, 0.5, 5)[:, None] * np.eye(6, dtype=np.float32)[5]
    q = np.eye(6, dtype=np.float32)[5:]
    m = retrieval_metrics(q, np.array([7]), g, np.array([7, 1, 2, 3, 4]), ks=(1, 5),
                          query_category=np.array([3]), gallery_category=np.array([3, 3, 0, 3, 1]))
    assert m["recall@1"] == 1.0 and m["category_precision@5"] == 3 / 5
