"""Checkpoints and the predictor: saved weights load back to the same outputs, a mismatch is refused."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import load_model, save_model
from model.inference import Predictions, image_to_tensor, load_predictor, mixed_precision_dtype
from model.manifest import ModelMismatchError
from model.network import build_model, joint_category
from schemas.taxonomy import load_taxonomy
from training.config import TINY
from training.fmnist import load_fashion_mnist
from training.train import train


def _images(n=4, size=(40, 30)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def test_round_trip_gives_identical_outputs(tmp_path, mixed_taxonomy):
    torch.manual_seed(0)
    model = build_model("small_cnn", mixed_taxonomy, pretrained=False, embedding_dim=32).eval()
    manifest = save_model(model, tmp_path, model_version="m1", image_size=32, thresholds={"category": 0.4},
                          metrics={"test/top1": 0.5})
    assert manifest.weights_sha256 and manifest.taxonomy_sha256 == mixed_taxonomy.sha256()
    pred = load_predictor(tmp_path, device="cpu", mixed_precision=False)  # fp32: bit-for-bit the saved model
    assert pred.version == "m1" and pred.manifest.thresholds == {"category": 0.4}
    x = torch.stack([pred.preprocess(im) for im in _images()])
    assert x.shape == (4, 3, 32, 32)
    out = pred.predict(x)
    with torch.inference_mode():
        ref = model(x)
    joint, types = joint_category(ref.category.softmax(1), ref.type.softmax(1), model.category_type)
    np.testing.assert_allclose(out.category, joint.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.type, types.numpy(), rtol=1e-5, atol=1e-6)
    assert pred.manifest.type_head
    np.testing.assert_allclose(out.groups["style"], ref.groups["style"].sigmoid().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.embedding, ref.embedding.numpy(), rtol=1e-5, atol=1e-6)


def test_predictions_shapes_and_probabilities(tiny_model_dir, fmnist_taxonomy):
    pred = load_predictor(tiny_model_dir, device="cpu", taxonomy=fmnist_taxonomy)
    out = pred.predict(torch.stack([pred.preprocess(im.convert("L")) for im in _images(3)]))
    assert isinstance(out, Predictions)
    assert out.category.shape == (3, 10) and out.groups["colour"].shape == (3, 8)
    np.testing.assert_allclose(out.category.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out.groups["colour"].sum(1), 1.0, rtol=1e-5)  # exclusive: softmax
    assert out.embedding.dtype == np.float32 and out.embedding.shape == (3, 256)
    np.testing.assert_allclose(np.linalg.norm(out.embedding, axis=1), 1.0, rtol=1e-5)
    masks = pred.condition_masks()
    assert set(masks) == {"colour"} and masks["colour"].shape == (256,) and (masks["colour"] >= 0).all()
    # the tiny run calibrated thresholds for every group and recorded where it came from
    m = pred.manifest
    assert {"category", "colour"} <= set(m.thresholds) and m.data_fingerprint and m.metrics


def test_mixed_precision_predictions_match_fp32(tmp_path, fmnist_dir):
    """The worker predicts under bf16 autocast where the CPU has it: the same tags, near-identical scores
    and embeddings as fp32 on real garments, from a model trained enough to have opinions (a small CNN,
    60 steps); exactly fp32 where the CPU has no native bf16."""
    model_dir = train(replace(TINY, out_dir=tmp_path, data_dir=fmnist_dir, model_version="small", backbone="small_cnn",
                              pretrained=False, image_size=28, stage_steps=(0, 60, 0), batch_size=64,
                              train_items=2000, lr_classification=2e-3, augment="none"))
    x, _ = load_fashion_mnist(fmnist_dir, "test")
    fp32 = load_predictor(model_dir, device="cpu", mixed_precision=False)
    amp = load_predictor(model_dir, device="cpu")
    assert fp32.amp_dtype is None and amp.amp_dtype == mixed_precision_dtype(torch.device("cpu"))
    batch = torch.stack([fp32.preprocess(Image.fromarray(im).convert("RGB")) for im in x[:200]])
    a, b = fp32.predict(batch), amp.predict(batch)
    assert np.abs(a.category - b.category).max() < 0.05
    top2 = np.sort(a.category, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05  # near ties may go either way
    assert clear.sum() >= 100 and (a.category.argmax(1) == b.category.argmax(1))[clear].all()
    assert np.abs(a.groups["colour"] - b.groups["colour"]).max() < 0.05
    assert b.embedding.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b.embedding, axis=1), 1.0, rtol=1e-5)
    assert (a.embedding * b.embedding).sum(1).min() > 0.999  # cosine similarity


def test_tampered_weights_are_refused(tmp_path, mixed_taxonomy):
    model = build_model("small_cnn", mixed_taxonomy, pretrained=False, embedding_dim=32)
    save_model(model, tmp_path, model_version="m1", image_size=32)
    w = tmp_path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelMismatchError, match="sha256 differs"):
        load_predictor(tmp_path, device="cpu")


def test_wrong_taxonomy_is_refused(tmp_path, mixed_taxonomy):
    model = build_model("small_cnn", mixed_taxonomy, pretrained=False, embedding_dim=32)
    save_model(model, tmp_path, model_version="m1", image_size=32)
    with pytest.raises(ModelMismatchError, match="trained for taxonomy 'mixed'"):
        load_predictor(tmp_path, device="cpu", taxonomy=load_taxonomy("fashion-mnist"))


def test_edited_manifest_taxonomy_is_refused(tmp_path, mixed_taxonomy):
    model = build_model("small_cnn", mixed_taxonomy, pretrained=False, embedding_dim=32)
    save_model(model, tmp_path, model_version="m1", image_size=32)
    path = tmp_path / "manifest.json"
    doc = json.loads(path.read_text())
    doc["taxonomy"]["categories"][0]["name"] = "hoodie"
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelMismatchError, match="taxonomy_sha256"):
        load_model(tmp_path)


def test_unknown_backbone_and_shape_mismatch_are_refused(tmp_path, mixed_taxonomy, fmnist_taxonomy):
    model = build_model("small_cnn", mixed_taxonomy, pretrained=False, embedding_dim=32)
    save_model(model, tmp_path, model_version="m1", image_size=32)
    path = tmp_path / "manifest.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "backbone": "vit_huge"}))
    with pytest.raises(ModelMismatchError, match="unknown backbone 'vit_huge'"):
        load_model(tmp_path)
    # weights of a different embedding size than the manifest says
    path.write_text(json.dumps({**doc, "embedding_dim": 64}))
    with pytest.raises(ModelMismatchError, match="do not fit"):
        load_model(tmp_path)


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_predictor(tmp_path)


def test_flip_tta_is_saved_and_averages_each_photo_with_its_mirror(tmp_path, mixed_taxonomy):
    torch.manual_seed(0)
    model = build_model("small_cnn", mixed_taxonomy, pretrained=False, embedding_dim=32)
    x = torch.stack([image_to_tensor(im, 32, model.mean, model.std) for im in _images()])
    with torch.no_grad():  # BatchNorm statistics of real inputs, so outputs depend on the photo
        for _ in range(20):
            model(torch.cat([x, x.flip(3)]))
    model.eval()
    model.flip_tta = True
    assert save_model(model, tmp_path, model_version="m1", image_size=32).flip_tta
    pred = load_predictor(tmp_path, device="cpu", mixed_precision=False)
    assert pred.manifest.flip_tta and pred.model.flip_tta
    x = torch.stack([pred.preprocess(im) for im in _images()])
    out = pred.predict(x)
    with torch.inference_mode():
        a, b = model(x), model(x.flip(3))
    mean_logits = (a.category + b.category) / 2
    joint, _ = joint_category(mean_logits.softmax(1), ((a.type + b.type) / 2).softmax(1), model.category_type)
    np.testing.assert_allclose(out.category, joint.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.groups["colour"], ((a.groups["colour"] + b.groups["colour"]) / 2).softmax(1).numpy(),
                               rtol=1e-5, atol=1e-6)
    emb = torch.nn.functional.normalize(a.embedding + b.embedding, dim=1).numpy()
    np.testing.assert_allclose(out.embedding, emb, rtol=1e-5, atol=1e-6)
    # a photo and its mirror image now get the same tags and the same embedding
    mirrored = pred.predict(x.flip(3))
    np.testing.assert_allclose(mirrored.category, out.category, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mirrored.embedding, out.embedding, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out.category, a.category.softmax(1).numpy(), atol=1e-4)  # it is not the plain pass
