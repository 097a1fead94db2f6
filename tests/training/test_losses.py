import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.network import ModelOutput
from training.losses import (
    MISSING,
    BatchHardTriplet,
    LossWeights,
    MultitaskLoss,
    class_weights,
    masked_bce,
    masked_group_ce,
    pos_weights,
    task_weights,
)


def test_class_weights_inverse_frequency_clipped_mean_one():
    # counts 1, 9, 90: raw 1/count scaled to mean 1 → [2.70, 0.30, 0.03] → clip [0.5, 5] → renormalise
    labels = np.array([0] + [1] * 9 + [2] * 90)
    w = class_weights(labels, 3)
    raw = np.array([1, 1 / 9, 1 / 90])
    raw = raw / raw.mean()
    expect = np.clip(raw, 0.5, 5)
    expect = expect / expect.mean()
    np.testing.assert_allclose(w, expect, rtol=1e-6)
    assert w.mean() == pytest.approx(1.0)
    assert w[0] > w[1] >= w[2]


def test_class_weights_ignore_missing_and_handle_absent_classes():
    w = class_weights(np.array([0, 0, MISSING, 1]), 3)
    assert w.shape == (3,) and np.isfinite(w).all() and w.mean() == pytest.approx(1.0)


def test_pos_weights_are_neg_over_pos():
    y = np.array([[1, 0], [0, 0], [0, 1], [0, 1]])
    np.testing.assert_allclose(pos_weights(y), [3.0, 1.0], rtol=1e-5)


def test_task_weights_follow_label_share_with_a_floor_for_sparse_groups():
    # ratios 1.0, 0.5, 0.01 → r_avg = 0.5033, floor = r_avg / 3 = 0.1678
    w = task_weights({"colour": 1000, "sleeve": 500, "fabric": 10})
    floor = (1.0 + 0.5 + 0.01) / 3 / 3
    assert w == pytest.approx({"colour": 1.0, "sleeve": 0.5, "fabric": floor})


def test_masked_group_ce_ignores_rows_without_the_group():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    target = torch.tensor([0, MISSING, 1])
    got = masked_group_ce(logits, target)
    # only rows 0 and 2: -log softmax
    expect = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(-5) / (math.exp(5) + math.exp(-5)))) / 2
    assert got.item() == pytest.approx(expect, rel=1e-5)


def test_group_missing_in_whole_batch_adds_zero_and_no_gradient():
    logits = torch.randn(4, 3, requires_grad=True)
    loss = masked_group_ce(logits, torch.full((4,), MISSING))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_weighted_ce_matches_hand_computation():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 0])
    w = torch.tensor([2.0, 0.5])
    # weighted mean: sum(w_y * nll) / sum(w_y); both rows have class 0
    nll = [-math.log(math.e / (math.e + 1)), -math.log(1 / (1 + math.e))]
    assert masked_group_ce(logits, target, w).item() == pytest.approx(sum(nll) / 2, rel=1e-5)


def test_label_smoothing_matches_hand_computation_and_keeps_masking():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    target = torch.tensor([0, MISSING])
    ls, k = 0.1, 3
    logp = torch.log_softmax(logits[0], 0).tolist()
    # smoothed target: 1 - ls + ls/k on the label, ls/k on every other class; the MISSING row adds nothing
    want = -((1 - ls + ls / k) * logp[0] + ls / k * (logp[1] + logp[2]))
    assert masked_group_ce(logits, target, label_smoothing=ls).item() == pytest.approx(want, rel=1e-5)
    assert masked_group_ce(logits, target).item() == pytest.approx(-logp[0], rel=1e-5)


def test_masked_bce_with_pos_weight():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    present = torch.tensor([True, False])
    pw = torch.tensor([3.0, 1.0])
    got = masked_bce(logits, target, present, pw).item()
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expect = (-3.0 * math.log(sig(0.0)) - math.log(1 - sig(2.0))) / 2
    assert got == pytest.approx(expect, rel=1e-5)


def test_batch_hard_triplet_matches_hand_computation():
    # unit vectors on a circle; squared Euclidean distance d = 2 - 2 cos
    ang = torch.tensor([0.0, 0.3, 2.0, 2.4])
    emb = torch.stack([ang.cos(), ang.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    d = torch.cdist(emb, emb) ** 2
    losses = []
    for a in range(4):
        pos = max(d[a, p] for p in range(4) if p != a and labels[p] == labels[a])
        neg = min(d[a, n] for n in range(4) if labels[n] != labels[a])
        losses.append(max(0.0, float(pos - neg + 0.3)))
    nonzero = [v for v in losses if v > 0]
    expect = sum(nonzero) / len(nonzero) if nonzero else 0.0
    assert BatchHardTriplet(0.3)(emb, labels).item() == pytest.approx(expect, abs=1e-5)


def test_batch_hard_triplet_positive_when_classes_overlap():
    emb = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.05], [0.05, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])  # each anchor's negative is closer than its positive
    assert BatchHardTriplet(0.3)(emb, labels).item() > 1.0


def test_multitask_loss_combines_with_lambdas(mixed_taxonomy):
    torch.manual_seed(0)
    n = 8
    out = ModelOutput(category=torch.randn(n, 3), groups={"colour": torch.randn(n, 2), "sleeve": torch.randn(n, 3),
                                                          "style": torch.randn(n, 4)},
                      embedding=F.normalize(torch.randn(n, 16), dim=1))
    batch = {"category": torch.randint(0, 3, (n,)), "item_id": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
             "group/colour": torch.randint(0, 2, (n,)), "group/sleeve": torch.full((n,), MISSING),
             "group/style": torch.randint(0, 2, (n, 4)).float(), "present/style": torch.ones(n, dtype=torch.bool)}
    crit = MultitaskLoss(exclusive={"colour": True, "sleeve": True, "style": False},
                         weights=LossWeights(cls=0.2, ret=1.0, condition=0.0))
    total, parts = crit(out, batch, use_cls=True, use_ret=True)
    parts = {k: float(v) for k, v in parts.items()}  # detached 0-d tensors: read when logged
    cls = parts["cat"] + parts["attr/colour"] + parts["attr/sleeve"] + parts["attr/style"]
    assert parts["attr/sleeve"] == 0.0  # nobody has a sleeve label
    assert total.item() == pytest.approx(0.2 * cls + 1.0 * parts["triplet"], rel=1e-5)
    only_cls, _ = crit(out, batch, use_cls=True, use_ret=False)
    assert only_cls.item() == pytest.approx(0.2 * cls, rel=1e-5)
