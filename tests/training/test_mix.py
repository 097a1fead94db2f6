import numpy as np
import pytest
import torch

from training.train import mix_batch


def _batch(n=6):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8).clone()  # photo i is all i
    return x, {"category": torch.arange(n), "group/colour": torch.arange(n) + 10, "note": "kept"}


def test_cutmix_pastes_a_box_of_another_photo_and_weights_labels_by_the_area_kept():
    x, batch = _batch()
    mixed, other, lam = mix_batch(x, batch, "cutmix", np.random.default_rng(3))
    src = other["category"]  # the photo each row took its box from
    assert sorted(src.tolist()) == list(range(6)) and other["note"] == "kept"
    torch.testing.assert_close(other["group/colour"], src + 10)  # all labels permuted alike
    for i in range(6):
        own = (mixed[i] == i).all(dim=0)
        pasted = (mixed[i] == float(src[i])).all(dim=0)
        assert bool((own | pasted).all())
        if src[i] != i:  # the kept area is exactly lam
            assert float(own.float().mean()) == pytest.approx(lam)
    assert 0.0 < lam < 1.0 and x[0, 0, 0, 0] == 0  # a real box; the input is not changed in place


def test_mixup_blends_whole_photos():
    x, batch = _batch()
    mixed, other, lam = mix_batch(x, batch, "mixup", np.random.default_rng(0))
    expected = lam * torch.arange(6.0) + (1 - lam) * other["category"].float()
    torch.testing.assert_close(mixed[:, 0, 0, 0], expected)
    assert 0.0 < lam < 1.0
