"""Training augmentation (the levels of ``TrainConfig.augment``) and the eval transform, on uint8 HWC arrays →
normalised CHW tensors."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from model.inference import image_to_tensor
from training.config import AUGMENTATIONS

SHIFT = 0.1  # "shift": translation up to 10 % of the side (±2.8 px at 28 px)


def train_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...], colour_jitter: bool = True,
                    scale: tuple[float, float] = (0.7, 1.0), erasing: float = 0.5, level: str = "full") -> v2.Compose:
    """``full``: flip, ±10° rotation, colour jitter (off when colour is a predicted attribute), random
    resized crop, random erasing. ``shift``: the full set with translation instead of the
    resized crop and rotation — garments keep their scale and shape (the long-run choice for small,
    centred photos such as Fashion-MNIST). ``light``: flip and a mild crop only — converges faster in
    a minutes-long CPU budget. ``none``: the eval transform. Then the backbone's normalisation."""
    if level not in AUGMENTATIONS:
        raise RuntimeError(f"Invalid augmentation {level!r}. Only {', '.join(AUGMENTATIONS)} are supported.")
    steps: list = [v2.ToImage()]
    if level == "none":
        steps.append(v2.Resize((size, size), antialias=True))
    elif level == "light":
        steps += [v2.RandomResizedCrop(size, scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True),
                  v2.RandomHorizontalFlip(0.5)]
        colour_jitter, erasing = False, 0.0
    elif level == "shift":
        steps += [v2.Resize((size, size), antialias=True), v2.RandomHorizontalFlip(0.5),
                  v2.RandomAffine(degrees=0, translate=(SHIFT, SHIFT))]
    else:
        steps += [v2.RandomResizedCrop(size, scale=scale, ratio=(0.85, 1.18), antialias=True),
                  v2.RandomHorizontalFlip(0.5), v2.RandomRotation(10)]
    if level == "none":
        colour_jitter, erasing = False, 0.0
    if colour_jitter:
        steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if erasing > 0:
        steps.append(v2.RandomErasing(p=erasing, scale=(0.02, 0.15), value=0))
    return v2.Compose(steps)


class EvalTransform:
    """Exactly the Predictor's preprocessing, so validation numbers are what the worker sees."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return image_to_tensor(Image.fromarray(image), self.size, self.mean, self.std)


class BatchAugment:
    """The same augmentation levels as :func:`train_transform`, applied to a whole uint8 NHWC batch
    with tensor ops on the batch's device (one affine warp per batch, vectorised jitter and erasing).

    Why: per-image v2 transforms in DataLoader workers were the bottleneck — on 2 CPU cores they
    cost as much as the small CNN's step, and on a GPU they starve it. Hue jitter is left out (the
    other jitters are kept); rotation and crop pad with the border (the photo's background)."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], colour_jitter: bool = True,
                 scale: tuple[float, float] = (0.7, 1.0), erasing: float = 0.5, level: str = "full",
                 generator: torch.Generator | None = None) -> None:
        if level not in AUGMENTATIONS:
            raise RuntimeError(f"Invalid augmentation {level!r}. Only {', '.join(AUGMENTATIONS)} are supported.")
        self.size, self.level, self.generator = size, level, generator
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.shift = 0.0  # translation as a fraction of the side (crop position otherwise)
        if level == "light":
            self.scale, self.ratio, self.rotate, self.jitter, self.erasing = (0.85, 1.0), (0.9, 1.1), 0.0, False, 0.0
        elif level == "shift":
            self.scale, self.ratio, self.rotate, self.shift = (1.0, 1.0), (1.0, 1.0), 0.0, SHIFT
            self.jitter, self.erasing = colour_jitter, erasing
        else:
            self.scale, self.ratio, self.rotate = scale, (0.85, 1.18), 10.0
            self.jitter, self.erasing = colour_jitter, erasing

    def _rand(self, *shape: int, device: torch.device) -> torch.Tensor:
        return torch.rand(*shape, device=device, generator=self.generator)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 → (B, 3, size, size) float32, normalised."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        b, dev = x.shape[0], x.device
        if self.level == "none":
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            return (x - self.mean.to(dev)) / self.std.to(dev)
        # random resized crop (area fraction s, aspect r) + horizontal flip + rotation, as one affine warp
        r = self._rand(5, b, device=dev)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * r[0]
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * r[1]
        aspect = torch.exp(log_r)
        w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop size as a fraction of the image
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        # crop centre in normalised coordinates: inside the image, or shifted by up to ±shift of the side
        cx = (1 - w + 2 * self.shift) * (2 * r[2] - 1)
        cy = (1 - h + 2 * self.shift) * (2 * r[3] - 1)
        flip = torch.where(r[4] < 0.5, -1.0, 1.0)
        angle = (2 * self._rand(b, device=dev) - 1) * math.radians(self.rotate)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([w * cos * flip, -h * sin, cx], 1),
                             torch.stack([w * sin * flip, h * cos, cy], 1)], 1)
        grid = F.affine_grid(theta, [b, 3, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.jitter:  # brightness, contrast, saturation ±0.2, per image
            j = 0.8 + 0.4 * self._rand(3, b, 1, 1, 1, device=dev)
            x = x * j[0]
            grey = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - grey) * j[1] + grey
            lum = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            x = ((x - lum) * j[2] + lum).clamp_(0, 1)
        x = (x - self.mean.to(dev)) / self.std.to(dev)
        if self.erasing > 0:  # random erasing (value 0 after normalisation), area 2–15 %, aspect 0.3–3.3
            e = self._rand(5, b, device=dev)
            area = (0.02 + 0.13 * e[0]) * self.size * self.size
            aspect = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * e[1])
            eh = torch.sqrt(area * aspect).clamp(1, self.size)
            ew = torch.sqrt(area / aspect).clamp(1, self.size)
            y0 = (self.size - eh) * e[2]
            x0 = (self.size - ew) * e[3]
            pos = torch.arange(self.size, device=dev, dtype=torch.float32)
            rows = (pos.view(1, -1) >= y0[:, None]) & (pos.view(1, -1) < (y0 + eh)[:, None])
            cols = (pos.view(1, -1) >= x0[:, None]) & (pos.view(1, -1) < (x0 + ew)[:, None])
            mask = rows[:, :, None] & cols[:, None, :] & (e[4] < self.erasing)[:, None, None]
            x = x.masked_fill(mask[:, None], 0.0)
        return x
