"""Why the model predicted a tag: one Grad-CAM heat map per (group, value), drawn over the photo.

Grad-CAM (Selvaraju et al. 2017) weights the backbone's last convolutional feature map A (the input of
its global pooling) by the gradient of the tag's logit y, averaged over space:
``cam = ReLU(sum_k mean_ij(dy/dA_kij) * A_k)``, then bilinear upsampling to the photo and min–max scaling
to [0, 1] (as the reference implementations do: a floor shared by the whole photo is not evidence). One
forward pass per photo and one backward pass per tag, through whatever CNN trunk the registry built (every
registered backbone ends in an adaptive average pool).

Why this method:
- class-discriminative: the map depends on the tag asked about (a colour and a category of one photo
  differ), which a plain activation map or a saliency map of the embedding is not;
- it depends on the learned weights. Adebayo et al. 2018 ("Sanity checks for saliency maps") re-drew the
  maps after randomising the network's weights: Grad-CAM (and plain gradients) changed beyond recognition,
  guided backprop and guided Grad-CAM barely changed. Guided backprop zeroes every negative gradient at
  each ReLU on the way back, so what reaches the pixels is mostly the image's own edges, whatever the
  classifier above learned: it looks crisp and explains nothing. Grad-CAM's weights and feature maps both
  come from the trained layers, so a map that looks right is evidence about the model;
- cheap enough for a worker: one backward per tag, where SHAP needs many perturbed forward passes per
  photo for a comparable picture.
Its limit: the resolution of the last feature map (7×7 for EfficientNet-Lite0 at 224 px, 3×3 for the
small CNN at 28 px), so a map says "this region", not "these pixels".
"""
from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from torch import nn

from model.network import ModelOutput, MultitaskModel
from schemas.taxonomy import CATEGORY_GROUP, TYPE_GROUP

Target = tuple[str, int]  # (group, index of the value in that group's head)
HeatMap = npt.NDArray[np.float32]  # (H, W) in [0, 1]
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def value_names(model: MultitaskModel, group: str) -> list[str]:
    """The values of a group in head order: categories, types, or an attribute group's values."""
    tax = model.taxonomy
    if group == CATEGORY_GROUP:
        return tax.category_names
    if group == TYPE_GROUP:
        return list(tax.types)
    return list(tax.group(group).values)


def target_for(model: MultitaskModel, group: str, value: str) -> Target:
    """(group, index) for a tag as stored (e.g. ``("colour", "red")``); KeyError for an unknown one."""
    try:
        names = value_names(model, group)
    except KeyError as exc:
        raise KeyError(f"the model has no group {group!r}") from exc
    if value not in names:
        raise KeyError(f"{value!r} is not a value of {group!r} for this model")
    return group, names.index(value)


def _scores(model: MultitaskModel, out: ModelOutput, group: str) -> torch.Tensor:
    """(N, V) logits of one group. A model without a type head derives the type from the category (as
    the worker does): its score is the log-sum-exp of the type's categories, log P(type) up to a constant."""
    if group == CATEGORY_GROUP:
        return out.category
    if group == TYPE_GROUP:
        if out.type is not None:
            return out.type
        tax = model.taxonomy
        cols = [[i for i, c in enumerate(tax.categories) if c.type == t] for t in tax.types]
        never = torch.full_like(out.category[:, 0], -torch.inf)  # a type no category has
        return torch.stack([out.category[:, c].logsumexp(dim=1) if c else never for c in cols], dim=1)
    if group not in out.groups:
        raise KeyError(f"the model has no group {group!r}; groups: {sorted(out.groups)}")
    return out.groups[group]


class _LastFeatureMap:
    """Forward pre-hooks on the trunk's global pooling: keeps the input of the last pool that ran.

    Only this thread's forward passes count: a worker may predict with the same model on another thread
    while a heat map is drawn, and those passes run the hooks too."""

    def __init__(self, backbone: nn.Module) -> None:
        pools = [m for m in backbone.modules() if isinstance(m, _POOLS)]
        if not pools:
            raise ValueError("Grad-CAM needs a CNN trunk that ends in adaptive pooling; this backbone has none")
        self.maps: torch.Tensor | None = None
        self._thread = threading.get_ident()
        self._handles = [m.register_forward_pre_hook(self._keep) for m in pools]

    def _keep(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        if threading.get_ident() == self._thread and args and isinstance(args[0], torch.Tensor) \
                and args[0].ndim == 4:
            self.maps = args[0]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def explain_batch(model: MultitaskModel, images: torch.Tensor, targets: Sequence[Sequence[Target]]
                  ) -> list[list[HeatMap]]:
    """Heat maps for a batch: ``images`` (N, 3, H, W) preprocessed as for prediction, ``targets[i]`` the
    tags of image i. Returns, per image, one (H, W) float32 map in [0, 1] per target, in order.

    One forward pass for the batch; backward pass r takes the r-th target of every image at once (images
    do not interact in eval mode, so each image's gradient is its own). Runs in eval mode and fp32 with
    gradients on, whatever the caller's mode (inference_mode included), and restores the model's mode.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected an (N, 3, H, W) batch, got {tuple(images.shape)}")
    if len(targets) != len(images):
        raise ValueError(f"{len(images)} images but {len(targets)} target lists")
    n, _, h, w = images.shape
    heat: list[list[HeatMap]] = [[np.zeros((h, w), np.float32)] * len(t) for t in targets]
    rounds = max((len(t) for t in targets), default=0)
    if rounds == 0:
        return heat
    device = next(model.parameters()).device
    was_training = model.training
    hook = _LastFeatureMap(model.backbone)
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            # a leaf that needs its gradient: the graph reaches the feature map even with a frozen trunk
            x = images.detach().clone().to(device=device, dtype=torch.float32).requires_grad_(True)
            out: ModelOutput = model(x)
            maps = hook.maps
            if maps is None:
                raise ValueError("the backbone's pooling never ran: no feature map to explain")
            scores = {g: _scores(model, out, g) for g in {g for t in targets for g, _ in t}}
            for r in range(rounds):
                rows = [i for i in range(n) if r < len(targets[i])]
                picked = torch.stack([scores[targets[i][r][0]][i, targets[i][r][1]] for i in rows])
                grads = None
                if picked.requires_grad:
                    (grads,) = torch.autograd.grad(picked.sum(), maps, retain_graph=r < rounds - 1,
                                                   allow_unused=True)
                if grads is None:  # no picked logit depends on the photo
                    grads = torch.zeros_like(maps)
                weights = grads[rows].float().mean(dim=(2, 3), keepdim=True)  # (len(rows), K, 1, 1)
                cam = F.relu((weights * maps[rows].detach().float()).sum(dim=1, keepdim=True))
                cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
                low = cam.flatten(1).amin(dim=1).view(-1, 1, 1)
                span = (cam.flatten(1).amax(dim=1).view(-1, 1, 1) - low).clamp_min(1e-12)
                scaled = ((cam - low) / span).clamp_(0, 1).cpu().numpy().astype(np.float32)
                for j, i in enumerate(rows):
                    heat[i][r] = scaled[j]
    finally:
        hook.close()
        model.train(was_training)
    return heat


def explain(model: MultitaskModel, image: torch.Tensor, targets: Sequence[Target]
            ) -> dict[tuple[str, str], HeatMap]:
    """One photo's heat maps: ``image`` (3, H, W) preprocessed, ``targets`` [(group, index), …] →
    {(group, value): (H, W) float32 in [0, 1]}. An all-zero map: no region raised that logit more than another."""
    if image.ndim != 3:
        raise ValueError(f"expected a (3, H, W) image, got {tuple(image.shape)}")
    maps = explain_batch(model, image.unsqueeze(0), [list(targets)])[0]
    return {(g, value_names(model, g)[i]): m for (g, i), m in zip(targets, maps, strict=True)}


def mass_inside(heat: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of a heat map's mass inside ``box`` = (left, top, right, bottom), pixels, right/bottom excluded."""
    total = float(heat.sum())
    left, top, right, bottom = box
    return float(heat[top:bottom, left:right].sum()) / total if total > 0 else 0.0


def tensor_to_image(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """A preprocessed (3, H, W) tensor back to the RGB picture the model saw (undoing the normalisation)."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy(), mode="RGB")


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, limit: int = 80) -> str:
    """A file-name part from any id or tag value: kept as it is when already safe, else cleaned and given a
    short hash of the original ('T-shirt/top' → 'T-shirt_top_1c2b…'), so two values never share a file."""
    name = _UNSAFE.sub("_", text).strip("._")[:limit]
    if name and name == text:
        return name
    return f"{name}_{hashlib.sha256(text.encode()).hexdigest()[:8]}".lstrip("_")


def explanation_filename(listing_id: str, group: str, value: str) -> str:
    """``<listing>-<group>-<value>.png`` with every part made safe for a file name."""
    return f"{safe_name(listing_id)}-{safe_name(group)}-{safe_name(value)}.png"


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The photo with the heat map blended over it (matplotlib's "jet": blue cold, red hot), at the
    photo's size; a map of another size is resized bilinearly."""
    base = image.convert("RGB")
    if heat.shape != (base.height, base.width):
        heat = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F")
                          .resize(base.size, Image.Resampling.BILINEAR))
    rgb = (colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255).astype(np.uint8)
    # weaker where the map is cold, so the garment stays readable outside the hot region
    a = (alpha * (0.3 + 0.7 * np.clip(heat, 0, 1)))[..., None]
    mixed = np.asarray(base, dtype=np.float32) * (1 - a) + rgb.astype(np.float32) * a
    return Image.fromarray(mixed.round().astype(np.uint8), mode="RGB")


def overlay_png(image: Image.Image, heat: np.ndarray, path: Path | str, min_side: int = 224) -> Path:
    """Write :func:`overlay` as a PNG; photos smaller than ``min_side`` (28 px garments) are enlarged first
    so the map can be seen."""
    base = image.convert("RGB")
    if min(base.size) < min_side:
        scale = min_side / min(base.size)
        base = base.resize((round(base.width * scale), round(base.height * scale)), Image.Resampling.BICUBIC)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(base, heat).save(path, format="PNG")
    return path
