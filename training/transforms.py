"""Augmentation (seed 000) and the eval transform, on uint8 HWC arrays → normalised CHW tensors."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from training.inference import image_to_tensor


AUGMENTATIONS = ("seed", "light", "none")


def train_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...], colour_jitter: bool = True,
                    scale: tuple[float, float] = (0.7, 1.0), erasing: float = 0.5, level: str = "seed") -> v2.Compose:
    """``seed``: flip, ±10° rotation, colour jitter (off when colour is a predicted attribute), random
    resized crop, random erasing (seed 000). ``light``: flip and a mild crop only — converges faster in
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
