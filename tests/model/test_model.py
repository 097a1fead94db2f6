"""The backbones and the multitask model: head sizes, frozen layers, weights from files, presets."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from skimage import data

from model.backbones import build_lite0_classifier, create_backbone, list_backbones
from model.inference import mixed_precision_dtype
from model.network import build_model
from training.config import PRESETS, TrainConfig
from training.train import _lr_at, _set_trainable


def test_registry_lists_backbones_and_rejects_unknown():
    assert {"resnet50", "efficientnet_lite0", "small_cnn"} <= set(list_backbones())
    with pytest.raises(RuntimeError, match="Unknown backbone 'vgg'"):
        create_backbone("vgg")


def test_head_sizes_follow_the_taxonomy(mixed_taxonomy):
    model = build_model("small_cnn", mixed_taxonomy, pretrained=False, embedding_dim=64).eval()
    out = model(torch.randn(5, 3, 32, 32))
    assert out.category.shape == (5, 3)
    assert {g: t.shape for g, t in out.groups.items()} == {"colour": (5, 2), "sleeve": (5, 3), "style": (5, 4)}
    assert out.embedding.shape == (5, 64)
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(5))
    masks = model.condition_masks()
    assert masks.shape == (3, 64) and bool((masks >= 0).all())


def test_shared_mlp_is_1024_then_512_wide_with_dropout(fmnist_taxonomy):
    model = build_model("small_cnn", fmnist_taxonomy, pretrained=False)
    linear = [m for m in model.shared if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(192, 1024), (1024, 512)]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.shared)


def test_resnet50_keeps_its_early_layers_frozen(fmnist_taxonomy):
    model = build_model("resnet50", fmnist_taxonomy, pretrained=False)
    frozen = model.freeze_backbone_layers(multitask=True)
    assert any(n.startswith("backbone.net.layer2.") for n in frozen)
    assert any(n.startswith("backbone.net.conv1.") for n in frozen)
    # every training stage keeps them frozen
    for spec in TrainConfig().stages():
        _set_trainable(model, spec, set(model.frozen_backbone))
        assert not any(p.requires_grad for n, p in model.named_parameters() if n in set(frozen))
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("net.layer3.", "net.layer4.")) for n in trainable)
    out = model.eval()(torch.randn(2, 3, 64, 64))
    assert out.category.shape == (2, 10) and out.embedding.shape == (2, 256)


def test_resnet50_loads_weights_from_a_file(tmp_path, fmnist_taxonomy):
    ref = torchvision.models.resnet50(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r50.pth")
    bb = create_backbone("resnet50", weights_path=tmp_path / "r50.pth")
    torch.testing.assert_close(bb.module.net.conv1.weight, ref.conv1.weight)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision ResNet-50"):
        create_backbone("resnet50", weights_path=tmp_path / "bad.pth")


def test_lite0_weights_are_real_imagenet_weights():
    """A real photo of a cat (skimage's chelsea) must land in ImageNet's cat classes (281-285)."""
    net = build_lite0_classifier(pretrained=True).eval()
    img = Image.fromarray(data.chelsea()).convert("RGB").resize((224, 224))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    with torch.inference_mode():
        top5 = net(x[None]).topk(5).indices[0].tolist()
    assert top5[0] in range(281, 286), top5


@pytest.mark.parametrize("name,params_m", [("wrn16_8", 11.0), ("wrn28_10", 36.5)])
def test_wide_resnets_pool_28px_garments_to_their_width(name, params_m):
    bb = create_backbone(name, pretrained=False)
    feats = bb.module.eval()(torch.zeros(2, 3, 28, 28))
    assert feats.shape == (2, bb.feat_dim) and bb.feat_dim == {"wrn16_8": 512, "wrn28_10": 640}[name]
    n = sum(p.numel() for p in bb.module.parameters()) / 1e6
    assert abs(n - params_m) / params_m < 0.05  # the published sizes: the architecture is the paper's


def test_cpu_training_skips_bf16_for_depthwise_convolutions(monkeypatch):
    """bf16 training on the CPU only where it is faster: not for grouped (depthwise) convolutions, whose
    oneDNN bf16 backward is slower than fp32; prediction keeps bf16 for every model."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # as on this EPYC
    cpu = torch.device("cpu")
    lite0 = create_backbone("efficientnet_lite0", pretrained=False).module
    small = create_backbone("small_cnn", pretrained=False).module
    assert mixed_precision_dtype(cpu, training=True, model=small) == torch.bfloat16
    assert mixed_precision_dtype(cpu, training=True, model=lite0) is None
    assert mixed_precision_dtype(cpu, model=lite0) == torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # e.g. an AVX2-only CPU
    assert mixed_precision_dtype(cpu, training=True, model=small) is None and mixed_precision_dtype(cpu) is None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_their_model_at_their_image_size(name, fmnist_taxonomy):
    # a preset's mistake (unknown backbone, a size its trunk cannot pool) should show here, not on a lent GPU
    cfg = PRESETS[name]
    assert cfg.stages() and all(s.steps > 0 for s in cfg.stages())
    model = build_model(cfg.backbone, fmnist_taxonomy, pretrained=False, embedding_dim=cfg.embedding_dim).eval()
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, cfg.image_size, cfg.image_size))
    assert out.category.shape == (2, len(fmnist_taxonomy.categories))
    assert out.embedding.shape == (2, cfg.embedding_dim)


def test_joint_warmup_ramps_only_the_joint_stage_lr():
    cfg = TrainConfig(joint_warmup=0.1, lr_joint=3e-4)
    stages = {s.name: s for s in cfg.stages()}
    joint = stages["3-joint"]
    cosine = lambda f: 1e-5 + (3e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi * f))  # noqa: E731
    assert _lr_at(joint, 0.0) == 0.0
    assert _lr_at(joint, 0.05) == pytest.approx(0.5 * cosine(0.05))
    assert _lr_at(joint, 0.1) == pytest.approx(cosine(0.1))  # then the plain schedule
    assert _lr_at(joint, 0.6) == pytest.approx(cosine(0.6))
    # the other stages start at their full lr, as without warm-up
    assert _lr_at(stages["2-classification"], 0.0) == pytest.approx(cfg.lr_classification)
    assert _lr_at(stages["1-retrieval"], 0.0) == cfg.lr_retrieval
    assert _lr_at(TrainConfig().stages()[2], 0.0) == pytest.approx(TrainConfig().lr_joint)
