"""Calibrated thresholds never shut a label out: a per-label threshold needs MIN_SUPPORT validation
examples, and no threshold exceeds MAX_THRESHOLD."""
from __future__ import annotations

import numpy as np
import pytest

from schemas.events import ListingEvent
from schemas.taxonomy import load_taxonomy
from training.calibration import (
    MAX_THRESHOLD,
    MIN_SUPPORT,
    best_f1_threshold,
    calibrate_exclusive,
    calibrate_multilabel,
)
from worker.tagging import decide


def _rows(*pairs: tuple[list[float], int]) -> tuple[np.ndarray, np.ndarray]:
    probs = np.array([p for p, _ in pairs], dtype=np.float32)
    return probs, np.array([label for _, label in pairs])


def test_a_label_with_few_examples_all_right_falls_back_to_the_group_threshold():
    # b: two validation examples, both right, both saturated: best F1 alone cuts at 1.00
    few_b = [([0.0, 1.0], 1)] * 2
    many_a = [([0.9, 0.1], 0), ([0.8, 0.2], 0), ([0.7, 0.3], 0), ([0.65, 0.35], 0), ([0.6, 0.4], 1),
              ([0.95, 0.05], 0)]
    probs, labels = _rows(*few_b, *many_a)
    chosen_b = probs.argmax(axis=1) == 1
    assert best_f1_threshold(probs.max(axis=1)[chosen_b], np.ones(2, bool), cap=1.0)[0] == 1.0  # the old 1.00
    group_t, per = calibrate_exclusive(probs, labels, ["a", "b"], "g")
    assert "g/b" not in per  # 2 < MIN_SUPPORT: the worker uses the group's threshold for b
    assert per["g/a"] == pytest.approx(0.65)  # 6 examples: fit on them (cut above the wrong 0.6)
    assert group_t < 1.0


def test_no_threshold_exceeds_the_cap_even_with_many_saturated_examples():
    probs, labels = _rows(*[([1.0, 0.0], 0)] * (MIN_SUPPORT + 3), *[([0.0, 1.0], 1)] * (MIN_SUPPORT + 1))
    group_t, per = calibrate_exclusive(probs, labels, ["a", "b"], "g")
    assert per == {"g/a": MAX_THRESHOLD, "g/b": MAX_THRESHOLD} and group_t == MAX_THRESHOLD
    assert MAX_THRESHOLD < 1.0


def test_the_worker_fills_a_near_certain_prediction_with_the_calibrated_thresholds():
    tax = load_taxonomy("fashion-mnist")
    values = tax.group("colour").values
    red = values.index("red")
    # validation: red predicted 6 times, all right, all saturated at 1.0
    probs = np.zeros((6, len(values)), dtype=np.float32)
    probs[:, red] = 1.0
    group_t, per = calibrate_exclusive(probs, np.full(6, red), values, "colour")
    photo = np.full(len(values), 0.005 / (len(values) - 1))
    photo[red] = 0.995
    cat = np.full(len(tax.category_names), 0.01)
    cat[tax.category_names.index("Pullover")] = 0.91
    event = ListingEvent(listing_id="l1", seller_id="s1", images=["x.png"])
    enr = decide(event, tax, "m1", cat, {"colour": photo}, {"colour": group_t}, per, 0.5)
    assert enr.tags["colour"].value == "red" and not [r for r in enr.review if r.group == "colour"]


def test_multilabel_labels_need_support_and_the_group_threshold_covers_the_rest():
    rng = np.random.default_rng(0)
    n = 40
    target = np.zeros((n, 3))
    target[:10, 0] = 1  # x: 10 positives
    target[10:12, 1] = 1  # y: 2 positives, scored 1.0: alone it would get 1.00
    probs = rng.uniform(0.0, 0.4, size=(n, 3))
    probs[:10, 0] = rng.uniform(0.6, 0.9, size=10)
    probs[10:12, 1] = 1.0
    group_t, per = calibrate_multilabel(probs, target, ["x", "y", "z"], "g")
    assert set(per) == {"g/x"} and 0.4 < per["g/x"] <= 0.9
    assert group_t <= MAX_THRESHOLD
