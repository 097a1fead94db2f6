from collections import Counter

import numpy as np
import pytest
import torch

from training.samplers import class_balanced_sampler, m_per_item_sampler


def test_m_per_item_batches_hold_m_photos_of_each_item():
    items = np.repeat(np.arange(40), 5)  # 40 items, 5 photos each
    sampler = m_per_item_sampler(items, batch_size=16, m=4)
    idx = list(iter(sampler))
    assert len(idx) == len(sampler) and len(idx) % 16 == 0
    for b in range(0, len(idx), 16):
        counts = Counter(items[idx[b:b + 16]].tolist())
        assert set(counts.values()) == {4} and len(counts) == 4


def test_m_per_item_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="multiple of m"):
        m_per_item_sampler(np.repeat(np.arange(10), 4), batch_size=10, m=4)


def test_balanced_sampler_oversamples_rare_classes():
    labels = np.array([0] * 900 + [1] * 100)
    s = class_balanced_sampler(labels, 2, num_samples=20000, generator=torch.Generator().manual_seed(0))
    drawn = labels[list(iter(s))]
    # class weights 1/count scaled to mean 1 → [0.2, 1.8] → clip → renormalised [0.435, 1.565]
    expect = 100 * 1.565 / (900 * 0.435 + 100 * 1.565)  # ≈ 0.286, against a natural 0.10
    assert (drawn == 1).mean() == pytest.approx(expect, abs=0.02)


def test_augmentation_levels_and_colour_jitter_switch():
    from torchvision.transforms import v2

    from training.transforms import train_transform

    img = np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8)
    for level in ("full", "light", "none"):
        t = train_transform(32, (0.5,) * 3, (0.5,) * 3, colour_jitter=True, level=level)
        x = t(img)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and float(x.min()) >= -1.0 - 1e-6
    kinds = lambda t: {type(s) for s in t.transforms}  # noqa: E731
    assert v2.ColorJitter in kinds(train_transform(32, (0.5,) * 3, (0.5,) * 3, colour_jitter=True))
    assert v2.ColorJitter not in kinds(train_transform(32, (0.5,) * 3, (0.5,) * 3, colour_jitter=False))
    assert v2.RandomErasing in kinds(train_transform(32, (0.5,) * 3, (0.5,) * 3, level="full"))
    with pytest.raises(RuntimeError, match="Invalid augmentation"):
        train_transform(32, (0.5,) * 3, (0.5,) * 3, level="heavy")


def test_interleaved_batches_for_partly_identified_data():
    from training.samplers import make_batch_sampler

    # rows 0-39: category only (Category & Attribute); rows 40-79: 10 items × 4 photos, no category (In-shop)
    labels = np.r_[np.arange(40) % 4, np.full(40, -1)]
    items = np.r_[np.full(40, -1), np.repeat(np.arange(10), 4)]
    bs = make_batch_sampler("m_per_item", labels=labels, item_ids=items, num_classes=4, batch_size=8, m=4)
    batches = list(iter(bs))
    assert len(batches) == len(bs) and len(batches) >= 2
    for i, b in enumerate(batches):
        if i % 2 == 0:  # retrieval batch: 2 items × 4 photos, all identified
            assert (items[b] >= 0).all() and set(Counter(items[b].tolist()).values()) == {4}
        else:  # classification batch: only rows with a category
            assert (labels[b] >= 0).all()
    # a retrieval-only stage draws retrieval batches only: the others would add no loss
    only = list(iter(make_batch_sampler("m_per_item", labels=labels, item_ids=items, num_classes=4, batch_size=8,
                                        m=4, classification=False)))
    assert only and all((items[b] >= 0).all() for b in only)


def test_m_per_item_photos_are_distinct_and_items_with_few_photos_cycle():
    items = np.array([0] * 6 + [1] * 2 + [2] * 4 + [3] * 4)  # item 1 has fewer photos than m
    sampler = m_per_item_sampler(items, batch_size=8, m=4, length=64)
    idx = np.array(list(iter(sampler))).reshape(-1, 4)  # one row per (item, pass) draw
    for row in idx:
        assert len(set(items[row])) == 1
        item = items[row[0]]
        assert len(set(row.tolist())) == min(4, int((items == item).sum()))
    # over many passes every photo of the 6-photo item is drawn
    drawn = {i for _ in range(20) for i in iter(sampler) if items[i] == 0}
    assert drawn == set(range(6))


def test_balanced_sampler_draws_attribute_only_rows_when_marked_labelled():
    labels = np.array([0, 1, -1, -1])  # rows 2 and 3 have no category; row 2 has an attribute label
    labelled = np.array([True, True, True, False])
    drawn = set(iter(class_balanced_sampler(labels, 2, num_samples=2000, generator=torch.Generator().manual_seed(0),
                                            labelled=labelled)))
    assert drawn == {0, 1, 2}
    drawn = set(iter(class_balanced_sampler(labels, 2, num_samples=2000, generator=torch.Generator().manual_seed(0))))
    assert drawn == {0, 1}


def test_labelled_rows_count_any_label():
    from training.data import LabelledImages

    data = LabelledImages(np.zeros((4, 2, 2, 3), np.uint8), category=np.array([3, -1, -1, -1]),
                          item_ids=np.zeros(4, np.int64),
                          groups={"colour": np.array([-1, 2, -1, -1]), "style": np.zeros((4, 2), np.float32)},
                          present={"style": np.array([False, False, True, False])})
    assert data.labelled().tolist() == [True, True, True, False]
