"""Grad-CAM heat maps (model/explain.py): where the answer is known, the map's mass lies on the garment.

The known-answer tests train a small CNN in the test on Fashion-MNIST trousers and bags pasted at random
places on a blank canvas twice the garment's side: none, one or both per picture, the model saying which
are there (one sigmoid per tag). So the model must find each garment wherever it is, and each tag needs
its own garment: with one softmax over the two, "bag" can be learned as "no trouser anywhere", whose
evidence is the blank canvas. Then a held-out garment pasted into each quadrant in turn (its box: a quarter
of the canvas) must hold most of its tag's heat; and with a trouser and a bag in one picture, each tag's map
must lie on its own garment, which an explanation that ignores the tag (edges, activations) cannot do.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.explain import (
    explain,
    explain_batch,
    explanation_filename,
    mass_inside,
    overlay_png,
    target_for,
    tensor_to_image,
)
from model.inference import image_to_tensor
from model.network import build_model
from schemas.taxonomy import load_taxonomy
from training.fmnist import load_fashion_mnist

CANVAS, SIDE = 48, 24  # the garment's box covers a quarter of the canvas
TROUSER, BAG = 1, 8  # Fashion-MNIST labels = category indices of the fashion-mnist taxonomy
MEAN = STD = (0.5, 0.5, 0.5)  # small_cnn's normalisation
QUADRANTS = [(0, 0), (SIDE, 0), (0, SIDE), (SIDE, SIDE)]
MIN_MASS_MEAN = 0.6  # chance (a map spread evenly) puts 0.25 in the box
MIN_MASS_OWN = 0.4  # with two garments a map may also touch the other one
TRAIN = 300  # pictures to train on; garments from index TRAIN on are held out


def _garment(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((SIDE, SIDE), Image.Resampling.BILINEAR))


def _canvas(*placed: tuple[np.ndarray, tuple[int, int]]) -> torch.Tensor:
    c = np.zeros((CANVAS, CANVAS), np.uint8)
    for garment, (x, y) in placed:
        c[y:y + SIDE, x:x + SIDE] = np.maximum(c[y:y + SIDE, x:x + SIDE], _garment(garment))
    return image_to_tensor(Image.fromarray(c).convert("RGB"), CANVAS, MEAN, STD)


def _box(x: int, y: int) -> tuple[int, int, int, int]:
    return x, y, x + SIDE, y + SIDE


@pytest.fixture(scope="module")
def garments(fmnist_dir) -> dict[int, np.ndarray]:
    """label → its 28×28 images; the first TRAIN of each train the model, the rest are held out."""
    images, labels = load_fashion_mnist(fmnist_dir, "test")
    return {label: images[labels == label] for label in (TROUSER, BAG)}


@pytest.fixture(scope="module")
def placed_model(garments):
    """small_cnn trained for "which of trouser and bag does the picture hold" (a few hundred pictures)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pictures, present = [], torch.zeros(TRAIN, 2)
    for k in range(TRAIN):
        u = rng.random()
        which = [] if u < 0.1 else [0, 1] if u < 0.4 else [int(rng.integers(2))]
        if len(which) == 2:  # two quadrants, jittered: the garments never overlap much
            spots = [np.clip(np.array(QUADRANTS[q]) + rng.integers(-4, 5, 2), 0, CANVAS - SIDE)
                     for q in rng.choice(4, 2, replace=False)]
        else:
            spots = [rng.integers(0, CANVAS - SIDE + 1, 2) for _ in which]
        pictures.append(_canvas(*[(garments[(TROUSER, BAG)[w]][k], tuple(int(v) for v in xy))
                                  for w, xy in zip(which, spots, strict=True)]))
        present[k, which] = 1.0
    xs = torch.stack(pictures)
    model = build_model("small_cnn", load_taxonomy("fashion-mnist"), pretrained=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(2):
        for idx in torch.randperm(TRAIN).split(32):
            loss = F.binary_cross_entropy_with_logits(model(xs[idx]).category[:, [TROUSER, BAG]], present[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    # BatchNorm's running statistics lag a short run: recompute them on the training pictures
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        for chunk in xs.split(100):
            model(chunk)
    return model.eval()


def test_the_heat_map_of_a_garment_on_a_blank_canvas_lies_on_the_garment(placed_model, garments):
    masses, peaks_inside, seen = [], 0, 0
    for q, (x, y) in enumerate(QUADRANTS):
        for label in (TROUSER, BAG):
            image = _canvas((garments[label][TRAIN + q], (x, y)))
            with torch.no_grad():
                seen += placed_model(image[None]).category[0, label].item() > 0
            (heat,) = explain(placed_model, image, [("category", label)]).values()
            peak_y, peak_x = np.unravel_index(heat.argmax(), heat.shape)
            peaks_inside += x <= peak_x < x + SIDE and y <= peak_y < y + SIDE
            masses.append(mass_inside(heat, _box(x, y)))
    print(f"heat-map mass inside the garment's box (a quarter of the canvas): mean {np.mean(masses):.3f}, "
          f"min {np.min(masses):.3f}; peak inside in {peaks_inside} of {len(masses)}")
    assert seen >= len(masses) - 1  # the model learned to see the garments
    assert np.mean(masses) >= MIN_MASS_MEAN and np.median(masses) >= MIN_MASS_MEAN, masses
    assert peaks_inside >= len(masses) - 1


def test_each_tag_is_explained_by_its_own_garment(placed_model, garments):
    own, other = [], []
    for q in range(4):
        at_t, at_b = QUADRANTS[q], QUADRANTS[3 - q]  # opposite corners
        picture = _canvas((garments[TROUSER][TRAIN + 4 + q], at_t), (garments[BAG][TRAIN + 4 + q], at_b))
        heat = explain(placed_model, picture, [("category", TROUSER), ("category", BAG)])
        h_t, h_b = heat[("category", "Trouser")], heat[("category", "Bag")]
        own += [mass_inside(h_t, _box(*at_t)), mass_inside(h_b, _box(*at_b))]
        other += [mass_inside(h_b, _box(*at_t)), mass_inside(h_t, _box(*at_b))]
    print(f"two garments: mass on the tag's own garment {np.mean(own):.3f}, on the other {np.mean(other):.3f}")
    assert np.mean(own) >= MIN_MASS_OWN and np.mean(own) > np.mean(other) + 0.1, (own, other)


# ------------------------------------------------------------------------------------------ the interface

@pytest.mark.parametrize("backbone, size", [("small_cnn", 28), ("resnet18_lowres", 32), ("efficientnet_lite0", 64)])
def test_every_kind_of_trunk_gives_one_map_per_tag_at_the_image_size(backbone, size, fmnist_taxonomy):
    torch.manual_seed(0)
    model = build_model(backbone, fmnist_taxonomy, pretrained=False).train()
    image = torch.randn(3, size, size)
    tags = [("category", 3), ("colour", 0), ("type", 1)]
    with torch.inference_mode():  # as a predictor's caller would be
        heat = explain(model, image, tags)
    assert list(heat) == [("category", "Dress"), ("colour", fmnist_taxonomy.group("colour").values[0]),
                          ("type", fmnist_taxonomy.types[1])]
    for m in heat.values():
        assert m.shape == (size, size) and m.dtype == np.float32
        assert m.min() >= 0 and m.max() <= 1
    assert model.training  # the caller's mode is restored
    assert all(p.grad is None for p in model.parameters())  # the weights are left as they were


def test_one_batched_call_gives_the_maps_of_single_calls(fmnist_taxonomy):
    torch.manual_seed(1)
    model = build_model("small_cnn", fmnist_taxonomy, pretrained=False).eval()
    images = torch.randn(3, 3, 32, 32)
    targets = [[("category", 0), ("colour", 2)], [], [("category", 5)]]
    batched = explain_batch(model, images, targets)
    assert [len(b) for b in batched] == [2, 0, 1]
    for image, tags, maps in zip(images, targets, batched, strict=True):
        single = list(explain(model, image, tags).values())
        for a, b in zip(maps, single, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_forward_pass_on_another_thread_meanwhile_does_not_change_the_map(fmnist_taxonomy):
    """A worker may predict with the model on one thread while another draws a heat map."""
    torch.manual_seed(3)
    model = build_model("small_cnn", fmnist_taxonomy, pretrained=False).eval()
    image, other = torch.randn(3, 32, 32), torch.randn(5, 3, 32, 32)
    alone = explain(model, image, [("category", 4)])[("category", "Coat")]

    def predict_elsewhere(_module, _args, _out):  # runs inside explain's forward pass, after its own hook
        if threading.current_thread() is threading.main_thread():
            t = threading.Thread(target=lambda: model(other))
            t.start()
            t.join()

    handle = model.backbone.pool.register_forward_hook(predict_elsewhere)
    try:
        meanwhile = explain(model, image, [("category", 4)])[("category", "Coat")]
    finally:
        handle.remove()
    np.testing.assert_allclose(meanwhile, alone, atol=1e-6)


def test_a_type_head_is_used_when_the_model_has_one(fmnist_taxonomy):
    """A model with a type output explains `type` through it; one without derives the type from its category
    scores. The same weights but for the type head give another map, and the map follows the type head."""
    torch.manual_seed(2)
    headed = build_model("small_cnn", fmnist_taxonomy, pretrained=False).eval()
    assert headed.type_head is not None
    derived = build_model("small_cnn", fmnist_taxonomy, pretrained=False, type_head=False).eval()
    derived.load_state_dict({k: v for k, v in headed.state_dict().items() if not k.startswith("type_head.")})
    image = torch.randn(3, 32, 32)
    tag, key = [("type", 0)], ("type", fmnist_taxonomy.types[0])
    by_head = explain(headed, image, tag)[key]
    by_category = explain(derived, image, tag)[key]
    assert by_head.max() > 0 and by_category.max() > 0  # both maps show something
    assert not np.allclose(by_head, by_category, atol=1e-3)
    with torch.no_grad():  # other weights for the type head alone
        headed.type_head.weight.copy_(torch.randn_like(headed.type_head.weight))
    assert not np.allclose(explain(headed, image, tag)[key], by_head, atol=1e-3)


def test_targets_are_named_as_stored_and_unknown_ones_refused(fmnist_taxonomy):
    model = build_model("small_cnn", fmnist_taxonomy, pretrained=False)
    assert target_for(model, "category", "Bag") == ("category", fmnist_taxonomy.category_names.index("Bag"))
    assert target_for(model, "type", "footwear") == ("type", fmnist_taxonomy.types.index("footwear"))
    with pytest.raises(KeyError):
        target_for(model, "category", "Spaceship")
    with pytest.raises(KeyError):
        target_for(model, "fabric", "denim")


def test_file_names_are_safe_and_distinct():
    assert explanation_filename("L1", "category", "Bag") == "L1-category-Bag.png"
    a = explanation_filename("L1", "category", "T-shirt/top")
    b = explanation_filename("L1", "category", "T-shirt top")
    assert a != b and "/" not in a and " " not in b
    assert "/" not in explanation_filename("../../etc/passwd", "category", "..")
    assert not explanation_filename("../x", "c", "v").startswith(".")


def test_the_overlay_is_red_where_the_map_is_hot_and_keeps_the_photo_elsewhere(tmp_path):
    photo = Image.new("RGB", (20, 10), (128, 128, 128))
    heat = np.zeros((10, 20), np.float32)
    heat[:, 10:] = 1.0
    path = overlay_png(photo, heat, tmp_path / "sub" / "o.png")
    out = Image.open(path)
    assert out.format == "PNG" and out.size == (448, 224)  # enlarged: a 10 px photo is unreadable
    hot = np.asarray(out.convert("RGB"))[112, 400].astype(int)
    cold = np.asarray(out.convert("RGB"))[112, 40].astype(int)
    assert hot[0] > hot[2] + 40  # red
    assert cold[2] > cold[0] and abs(cold - 128).max() < 60  # a blue tint over the grey photo


def test_tensor_to_image_undoes_the_preprocessing():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    again = tensor_to_image(image_to_tensor(photo, 16, MEAN, STD), MEAN, STD)
    assert np.abs(np.asarray(again).astype(int) - np.asarray(photo).astype(int)).max() <= 1
