import math

import numpy as np
import pytest

from model.inference import Predictions
from schemas.taxonomy import load_taxonomy
from training.calibration import best_f1_threshold, calibrate_exclusive
from training.data import LabelledImages
from training.metrics import (
    average_precision,
    confusion_matrix,
    f1_scores,
    multilabel_metrics,
    per_attribute_f1,
    retrieval_metrics,
    topk_accuracy,
)
from training.scores import class_recall, group_map


def test_topk_accuracy_known_case():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3], [0.4, 0.35, 0.25]])
    labels = np.array([0, 1, 1, 2])
    acc = topk_accuracy(probs, labels, ks=(1, 2, 3))
    assert acc == {"top1": 0.5, "top2": 0.75, "top3": 1.0}


def test_macro_and_weighted_f1_known_case():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 1, 0])
    # class 0: tp 2, fp 1, fn 1 → F1 2/3; class 1: tp 2, fp 1, fn 0 → 0.8; class 2: tp 0 → 0
    f = f1_scores(pred, labels, 3)
    assert f["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert f["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 0.8 + 0) / 6)
    assert confusion_matrix(pred, labels, 3).tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_multilabel_metrics_known_case():
    target = np.array([[1, 0, 1], [0, 1, 0]])
    pred = np.array([[1, 0, 0], [0, 1, 0]])
    m = multilabel_metrics(pred, target)
    assert m["hamming"] == pytest.approx(1 / 6)
    assert m["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert m["exact_match"] == 0.5
    np.testing.assert_allclose(per_attribute_f1(pred, target), [1.0, 1.0, 0.0])


def test_retrieval_recall_and_map_at_r():
    # 2 queries; gallery ids [A, B, A, C]; query 0 = item A, query 1 = item C
    g = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1]], dtype=np.float32)
    gid = np.array([0, 1, 0, 2])
    q = np.array([[1, 0], [0.95, 0.05]], dtype=np.float32)
    qid = np.array([0, 2])
    m = retrieval_metrics(q, qid, g, gid, ks=(1, 2, 4))
    # query 0 ranking: g0 (A), g1 (B), g2 (A) → R@1 hit; R = 2: precision at rank1 = 1 → AP@R = (1 + 0)/2
    # query 1 ranking: g0, g1, g2, g3(C) → hit only at 4; R = 1 → AP@R = 0
    assert m["recall@1"] == 0.5 and m["recall@2"] == 0.5 and m["recall@4"] == 1.0
    assert m["map@r"] == pytest.approx((0.5 + 0.0) / 2)


def test_retrieval_category_precision_needs_both_sides():
    g = np.array([[1, 0], [0, 1]], dtype=np.float32)
    m = retrieval_metrics(g, np.array([0, 1]), g, np.array([0, 1]),
                          query_category=np.array([3, -1]), gallery_category=np.array([3, 4]))
    assert m["category_precision@5"] == 0.5  # the one query with a category: 1 of its 2 neighbours shares it
    with pytest.raises(ValueError, match="categories of both"):
        retrieval_metrics(g, np.array([0, 1]), g, np.array([0, 1]), query_category=np.array([3, 4]))


def test_average_precision_known_case():
    # positives at ranks 1 and 3: precision 1 and 2/3
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    assert math.isnan(average_precision(np.array([0.9, 0.8]), np.array([0, 0])))


def test_group_map_and_class_recall_count_only_labelled_rows():
    tax = load_taxonomy("fashion-mnist")  # 10 categories, one exclusive group: colour (8 values)
    n = 4
    category = np.full((n, 10), 0.01)
    category[[0, 1, 2, 3], [0, 0, 1, 1]] = 0.9  # predicted: T-shirt/top, T-shirt/top, Trouser, Trouser
    colour = np.zeros((n, 8))
    colour[:, 2] = [0.8, 0.99, 0.3, 0.5]  # row 1 has no colour label: its top score must not count
    colour[:, 3] = [0.1, 0.0, 0.6, 0.2]
    preds = Predictions(category=category, groups={"colour": colour}, embedding=np.zeros((n, 2), np.float32))
    data = LabelledImages(images=np.zeros((n, 1, 1, 3), np.uint8), category=np.array([0, 1, 1, -1]),
                          item_ids=np.full(n, -1), groups={"colour": np.array([2, -1, 2, 3])})
    # category over rows 0-2: T-shirt/top AP 1; Trouser ranked rows 2, 0, 1 → AP (1 + 2/3) / 2
    # colour over rows 0, 2, 3: value 2 ranked 0, 3, 2 → (1 + 2/3) / 2; value 3 ranked 2, 3, 0 → 1/2
    assert group_map(tax, preds, data) == pytest.approx({"map/category": (1 + 5 / 6) / 2,
                                                          "map/colour": (5 / 6 + 1 / 2) / 2})
    cm = confusion_matrix(category.argmax(1), data.category, 10)
    assert class_recall(cm, tax) == {"class_recall/T-shirt/top": 1.0, "class_recall/Trouser": 0.5}


def test_best_f1_threshold():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.3])
    positive = np.array([True, True, False, True, False])
    # cut at 0.6: tp 3, fp 1, fn 0 → F1 6/7; cut at 0.8: tp 2, fn 1 → 0.8
    t, f1 = best_f1_threshold(scores, positive)
    assert t == pytest.approx(0.6) and f1 == pytest.approx(6 / 7)


def test_calibrate_exclusive_per_label():
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.6, 0.4], [0.2, 0.8]])
    labels = np.array([0, 1, 0, 1])
    group_t, per = calibrate_exclusive(probs, labels, ["a", "b"], "g", min_support=1)  # the best-F1 cut itself
    # label a: chosen rows 0 (0.9 ✓), 2 (0.6 ✓), 1 (0.55 ✗) → best cut 0.6
    assert per["g/a"] == pytest.approx(0.6)
    assert per["g/b"] == pytest.approx(0.8)
    assert 0.0 <= group_t <= 1.0
