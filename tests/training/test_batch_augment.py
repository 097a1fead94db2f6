"""BatchAugment (whole-batch augmentation on the training device) and TensorBatches."""
import numpy as np
import pytest
import torch
from PIL import Image

from model.inference import image_to_tensor
from training.data import LabelledImages, TensorBatches
from training.losses import MISSING
from training.transforms import BatchAugment

HALF = ((0.5,) * 3, (0.5,) * 3)


def _photos(n: int = 6, size: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_level_none_is_exactly_the_predictors_preprocessing():
    imgs = _photos()
    got = BatchAugment(28, *HALF, level="none")(torch.from_numpy(imgs))
    want = torch.stack([image_to_tensor(Image.fromarray(im), 28, *HALF) for im in imgs])
    assert torch.equal(got, want)


@pytest.mark.parametrize("level", ["none", "light", "shift", "full"])
def test_shapes_and_resizing(level):
    out = BatchAugment(32, *HALF, level=level)(torch.from_numpy(_photos(size=28)))
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert float(out.min()) >= -1.0 - 1e-6 and float(out.max()) <= 1.0 + 1e-6


def test_same_generator_seed_same_batch_and_new_seed_differs():
    x = torch.from_numpy(_photos())
    a = BatchAugment(28, *HALF, level="full", generator=torch.Generator().manual_seed(3))(x)
    b = BatchAugment(28, *HALF, level="full", generator=torch.Generator().manual_seed(3))(x)
    c = BatchAugment(28, *HALF, level="full", generator=torch.Generator().manual_seed(4))(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_geometry_without_jitter_keeps_a_garments_colour():
    # a flat red photo: crops, flips and rotations (border padding) must not change its colour
    red = np.zeros((16, 28, 28, 3), np.uint8)
    red[..., 0] = 215
    red[..., 1:] = 30
    aug = BatchAugment(28, *HALF, level="full", colour_jitter=False, erasing=0.0,
                       generator=torch.Generator().manual_seed(0))
    out = aug(torch.from_numpy(red))
    want = (torch.tensor([215, 30, 30]) / 255.0 - 0.5) / 0.5
    assert torch.allclose(out, want.view(1, 3, 1, 1).expand_as(out), atol=1e-5)
    jittered = BatchAugment(28, *HALF, level="full", colour_jitter=True, erasing=0.0,
                            generator=torch.Generator().manual_seed(0))(torch.from_numpy(red))
    assert (jittered - want.view(1, 3, 1, 1)).abs().amax(dim=(1, 2, 3)).min() > 0.01  # every photo changed


def test_shift_moves_a_garment_without_resizing_it():
    # a 10×6 white block on black: "shift" keeps its size (area) and moves it at most 10 % of the side;
    # the full set's resized crop zooms it
    block = np.zeros((64, 28, 28, 3), np.uint8)
    block[:, 9:19, 11:17] = 255
    def areas_and_centres(level):
        out = BatchAugment(28, *HALF, level=level, colour_jitter=False, erasing=0.0,
                           generator=torch.Generator().manual_seed(0))(torch.from_numpy(block))
        mass = (out[:, 0] + 1) / 2  # back to 0..1
        ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
        area = mass.sum(dim=(1, 2))
        cy, cx = (mass * ys).sum(dim=(1, 2)) / area, (mass * xs).sum(dim=(1, 2)) / area
        return area, cy, cx
    area, cy, cx = areas_and_centres("shift")
    assert torch.allclose(area, torch.full_like(area, 60.0), atol=0.5)
    assert float((cy - 13.5).abs().max()) <= 2.8 + 1e-3 and float((cx - 13.5).abs().max()) <= 2.8 + 1e-3
    assert float((cy - 13.5).abs().max()) > 1.0  # it does move
    zoomed, _, _ = areas_and_centres("full")
    assert float(zoomed.max()) > 66.0  # crops of 70–100 % of the photo enlarge the garment


def test_random_erasing_blanks_one_rectangle_of_2_to_15_percent():
    white = np.full((32, 28, 28, 3), 255, np.uint8)
    out = BatchAugment(28, *HALF, level="full", colour_jitter=False, erasing=1.0,
                       generator=torch.Generator().manual_seed(1))(torch.from_numpy(white))
    erased = (out == 0).all(dim=1)  # (B, H, W): normalised value 0 in every channel
    frac = erased.float().mean(dim=(1, 2))
    assert bool((frac > 0.005).all()) and bool((frac < 0.2).all())
    for m in erased:  # a rectangle: its bounding box is completely erased
        rows, cols = torch.nonzero(m.any(1)).flatten(), torch.nonzero(m.any(0)).flatten()
        assert bool(m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all())
    kept = BatchAugment(28, *HALF, level="full", colour_jitter=False, erasing=0.0)(torch.from_numpy(white))
    assert torch.allclose(kept, torch.ones_like(kept), atol=1e-5)


def test_unknown_level_is_refused():
    with pytest.raises(RuntimeError, match="Invalid augmentation"):
        BatchAugment(28, *HALF, level="heavy")


def test_tensor_batches_gather_rows_with_their_labels():
    n = 10
    data = LabelledImages(images=_photos(n), category=np.arange(n) % 3, item_ids=np.arange(n) // 2,
                          groups={"colour": np.where(np.arange(n) % 4 == 0, MISSING, np.arange(n) % 5)})
    tb = TensorBatches(data, BatchAugment(28, *HALF, level="none"), torch.device("cpu"))
    b = tb.batch([7, 2, 2])
    assert b["category"].tolist() == [1, 2, 2]
    assert b["item_id"].tolist() == [3, 1, 1]
    assert b["group/colour"].tolist() == [2, 2, 2]
    assert torch.equal(b["image"][0], image_to_tensor(Image.fromarray(data.images[7]), 28, *HALF))
    # endless: more batches than one pass of the sampler holds
    batches = list(zip(range(5), tb.iterate([[0, 1], [2, 3]]), strict=False))  # the first 5 of an endless stream
    assert [b["category"].tolist() for _, b in batches] == [[0, 1], [2, 0], [0, 1], [2, 0], [0, 1]]


def test_tensor_batches_refuse_file_paths():
    data = LabelledImages(images=np.array(["a.jpg"], dtype=object), category=np.zeros(1, np.int64),
                          item_ids=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="uint8"):
        TensorBatches(data, BatchAugment(28, *HALF, level="none"), torch.device("cpu"))
