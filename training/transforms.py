"""Augmentation (seed 000) and the eval transform, on uint8 HWC arrays → normalised CHW tensors."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from training.inference import image_to_tensor


def train_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...], colour_jitter: bool = True,
                    scale: tuple[float, float] = (0.7, 1.0), erasing: float = 0.5) -> v2.Compose:
    """Flip, ±10° rotation, colour jitter (off when colour is a predicted attribute), random resized
    crop, random erasing, then the backbone's normalisation."""
    steps: list = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=scale, ratio=(0.85, 1.18), antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomRotation(10),
    ]
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
