"""Stable inference interface used by the worker: load a model directory, preprocess, predict.

`load_predictor(model_dir)` reads manifest.json + model.safetensors, checks them, and returns a
`Predictor` whose `predict` gives probabilities per tag group and the L2-normalised embedding.
Category and type probabilities agree (`model.network.joint_category`). `shelf_embedding` turns a listing's
image embedding and category into the vector that is stored, indexed and searched for similar items.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image

from model.checkpoint import load_model
from model.network import ModelOutput, MultitaskModel, joint_category
from schemas.manifest import ModelManifest
from schemas.taxonomy import Taxonomy


@dataclass
class Predictions:
    category: npt.NDArray[np.float32]  # (N, C) probabilities, columns = taxonomy.categories (joint with the type)
    groups: dict[str, npt.NDArray[np.float32]]  # group -> (N, V): softmax if exclusive, sigmoid otherwise
    embedding: npt.NDArray[np.float32]  # (N, D), L2-normalised
    type: npt.NDArray[np.float32] | None = None  # (N, T) probabilities, columns = manifest.taxonomy.types


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return dev


def mixed_precision_dtype(device: torch.device, training: bool = False,
                          model: torch.nn.Module | None = None) -> torch.dtype | None:
    """The autocast type for ``device`` (and, for training, ``model``), or None for plain fp32 (weights
    stay fp32 either way).

    CUDA: fp16 for prediction; for training bf16 where the GPU has it (fp16's loss scaler reads a flag
    back from the GPU every step). CPU: bf16 only where the CPU computes it natively (AVX512-BF16,
    AMX; emulated elsewhere, so slower): there it makes training steps and prediction faster with the
    same test metrics (benchmarks/train_step.py, benchmarks/pipeline_throughput.py). Except training on
    the CPU a model with grouped (depthwise) convolutions: oneDNN's bf16 backward for them is slower
    than fp32, though its forward pass is faster."""
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if training else torch.float16
    if training and model is not None and any(
            isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules()):
        return None
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
        except (AttributeError, RuntimeError):  # a torch build without oneDNN
            return None
    return None


def image_to_tensor(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The eval transform: RGB, resize to size×size (bilinear, antialiased), scale to [0,1], normalise."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def outputs_to_predictions(model: MultitaskModel, out: ModelOutput) -> Predictions:
    groups = {}
    for name, logits in out.groups.items():
        probs = logits.float().softmax(dim=1) if model.exclusive[name] else logits.float().sigmoid()
        groups[name] = probs.cpu().numpy()
    type_probs = None if out.type is None else out.type.float().softmax(dim=1)
    category, types = joint_category(out.category.float().softmax(dim=1), type_probs, model.category_type)
    return Predictions(
        category=category.cpu().numpy(),
        groups=groups,
        embedding=F.normalize(out.embedding.float(), dim=1).cpu().numpy().astype(np.float32),
        type=types.cpu().numpy(),
    )


def shelf_embedding(embedding: npt.ArrayLike, category: npt.ArrayLike, n_categories: int,
                    weight: float) -> npt.NDArray[np.float32]:
    """The vector similar items are ranked by: [√(1−w)·e, √w·onehot(category)], ``category`` (N,) the
    listing's category index (its tag where it has one, else the predicted one).

    Its inner product is (1−w)·e·e' + w·[same category]: a shelf ranks the same category first and, within
    it, by the image embedding, while a much closer photo of another category can still come in. Unit
    length, so faiss inner-product search needs nothing else. A one-hot rather than the probabilities:
    the two photos of one item often differ a little in their probabilities but rarely in their category,
    so the same item loses less rank (benchmarks/shelf_quality.py). w = 0: e itself."""
    e = np.asarray(embedding, dtype=np.float32)
    if weight <= 0:
        return e
    onehot = np.eye(n_categories, dtype=np.float32)[np.asarray(category, dtype=np.int64)]
    return np.concatenate([e * np.float32((1.0 - weight) ** 0.5), onehot * np.float32(weight ** 0.5)], axis=-1)


class Predictor:
    def __init__(self, model: MultitaskModel, manifest: ModelManifest, device: torch.device,
                 mixed_precision: bool = True) -> None:
        self.manifest = manifest
        self.version = manifest.model_version
        self.device = device
        self.amp_dtype = mixed_precision_dtype(device) if mixed_precision else None
        # channels_last on CPU too: oneDNN's convolutions run faster in it
        self.model = model.to(device).eval().to(memory_format=torch.channels_last)

    @property
    def taxonomy(self) -> Taxonomy:
        return self.manifest.taxonomy

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image → normalised CHW float tensor at the manifest's image size."""
        n = self.manifest.normalisation
        return image_to_tensor(image, self.manifest.image_size, n.mean, n.std)

    def predict(self, batch: torch.Tensor) -> Predictions:
        """NCHW batch (stacked `preprocess` outputs) → probabilities and embeddings."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) batch, got {tuple(batch.shape)}")
        cuda = self.device.type == "cuda"
        x = batch.to(self.device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                                    enabled=self.amp_dtype is not None):
            out = self.model.infer(x)
        return outputs_to_predictions(self.model, out)

    def predict_images(self, images: list[Image.Image]) -> Predictions:
        return self.predict(torch.stack([self.preprocess(im) for im in images]))

    def condition_masks(self) -> dict[str, npt.NDArray[np.float32]]:
        """Attribute group → its (D,) non-negative mask of the conditional similarity; the embedding conditioned
        on the group is normalize(e * mask)."""
        with torch.no_grad():
            masks = self.model.condition_masks().float().cpu().numpy()
        return {g: masks[i].copy() for i, g in enumerate(self.model.group_names)}


def load_predictor(model_dir: Path | str, device: str = "auto", taxonomy: Taxonomy | None = None,
                   mixed_precision: bool = True) -> Predictor:
    """Load and verify a model directory (manifest.json + weights). Raises ModelMismatchError on mismatch.

    ``taxonomy``: when given, the model must have been trained for exactly this taxonomy.
    ``mixed_precision``: autocast where the device computes it natively (:func:`mixed_precision_dtype`).
    """
    dev = resolve_device(device)
    model, manifest = load_model(model_dir, expected_taxonomy=taxonomy, map_location="cpu")
    return Predictor(model, manifest, dev, mixed_precision=mixed_precision)
