"""Training configuration: the stages of a strategy, every knob of a run, and the presets.

Stages (strategy ``staged``): 1 retrieval only (triplet, classification heads frozen), 2 classification
with the retrieval head frozen, 3 joint fine-tuning with λcls 0.2 / λret 1.0. Strategy ``unified``
trains everything at once from the start (the weaker variant, kept for the comparison).

A saved configuration (``config_dict``: a training report's ``config``, a stage checkpoint's) is read back with
``saved_config`` or ``config_from_dict``, which also take keys and values saved under an earlier name.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

STRATEGIES = ("staged", "unified")
# TrainConfig.augment: training.transforms implements them
AUGMENTATIONS = ("full", "shift", "light", "none")
# TrainConfig.label_loss: training.losses implements them ("ce" plain cross-entropy; the others resist wrong labels)
LABEL_LOSSES = ("ce", "gce", "bootstrap", "small_loss")


@dataclass
class LossWeights:
    """The factors of the loss terms (training.losses.MultitaskLoss)."""
    cls: float = 0.2  # λcls: classification relative to retrieval
    ret: float = 1.0  # λret
    condition: float = 0.1  # conditional-similarity triplets (per attribute group), within the retrieval term
    mask_l1: float = 5e-4  # λ2 on the condition masks' L1 norm


@dataclass
class StageSpec:
    name: str
    steps: int
    lr: float
    use_cls: bool
    use_ret: bool
    sampler: str  # "m_per_item" (triplet batches) or "balanced" (WeightedRandomSampler)
    schedule: str = "cosine"  # "cosine" (to 1e-5) or "step" (halve at each quarter, as StepLR every 5 of 20 epochs)
    train_cls: bool = True
    train_ret: bool = True
    select_on: str = "macro_f1"  # validation metric for early stopping / best checkpoint
    warmup: float = 0.0  # fraction of the stage over which the lr rises linearly from 0 to its schedule
    trunk_lr_scale: float = 1.0  # the backbone's lr relative to the heads'


@dataclass
class TrainConfig:
    out_dir: Path = Path(".enrich/models")
    dataset: str = "fmnist-shop"  # or "deepfashion", or "catalogue" (seller tags as noisy labels, training.catalogue)
    catalogue_source: str | None = None  # dataset "catalogue": "postgres" or a JSONL export (file or folder)
    data_dir: Path = Path("/usr/share/datasets/fashion-mnist")
    taxonomy: str = "fashion-mnist"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights_path: Path | None = None
    init_from: Path | None = None  # a saved model directory to start from (all weights), e.g. the active model
    # a stage checkpoint of an interrupted run (<out_dir>/<version>.checkpoint.pt) to go on from: its stages
    # are not trained again; the same version, weights, history and random state (training.train)
    resume: Path | None = None
    image_size: int = 48
    embedding_dim: int = 256
    # the category's weight in the shelf embedding (model/inference.py shelf_embedding; 0: image embedding alone)
    shelf_category_weight: float = 0.3
    strategy: str = "staged"
    stage_steps: tuple[int, int, int] = (3000, 3000, 6000)  # staged: retrieval, classification, joint
    unified_steps: int = 12000
    lr_retrieval: float = 1e-4  # AdamW, step schedule
    lr_classification: float = 1e-3  # AdamW, cosine schedule
    lr_joint: float = 3e-4
    lr_unified: float = 1e-3
    # Two knobs against the top-1 the joint stage costs at its start (its AdamW starts fresh on tuned
    # weights). Off in every preset: they trade R@1 for top-1 (benchmarks/recipe_ablation.py --stage joint).
    joint_warmup: float = 0.0  # fraction of the joint stage with a linear lr warm-up (its AdamW starts fresh)
    joint_trunk_lr: float = 1.0  # the joint stage's backbone lr ÷ its heads'
    weight_decay: float = 1e-4
    batch_size: int = 64
    m_per_item: int = 4
    photos_per_item: int = 4
    # + each training item's Fashion-MNIST image as published (grey; category only, colour and item id
    # masked): the category is then also learnt on the images published figures use (test_grey/ metrics)
    grey_photos: bool = False
    grey_repeats: int = 1  # the grey photos count this many times (their share of class-balanced batches)
    train_items: int | None = None  # None: every Fashion-MNIST train image not held out for validation
    val_items: int = 5000
    test_items: int | None = None  # None: all 10 000 test images
    test_photos_per_item: int = 3  # 1 query (the plain rendering) + gallery photos
    eval_every: int = 0  # steps between validations (0: end of each stage)
    patience: int = 5  # validations without improvement before a stage stops early
    time_budget_s: float | None = None  # training budget (data preparation excluded); stages share it by steps
    loss_weights: LossWeights = field(default_factory=LossWeights)
    task_weights: bool = False  # per-group loss weights from label counts (training.losses.task_weights)
    label_loss: str = "ce"  # LABEL_LOSSES: "bootstrap" etc. resist wrong labels
    # human-corrected rows count this many times: the cleanest labels we have, and from the marketplace's own
    # photos (benchmarks/retrain_corrections.py chose it over 4)
    correction_repeats: int = 16
    # weak labels from listing text (dataset catalogue): a group without a seller/corrected label whose listing
    # text names exactly one of its values (not negated) gets that value as a label, its loss ×this factor; 0: off
    weak_label_weight: float = 0.3
    # Fixed per-group loss factors. Colour is learnt from raw pixel statistics within a few steps and
    # at full weight its gradients swamp the category's, which then stays at chance for a while.
    group_loss_weights: dict[str, float] = field(default_factory=lambda: {"colour": 0.1})
    colour_jitter: bool | None = None  # None: off when the taxonomy predicts colour
    augment: str = "full"  # AUGMENTATIONS: full (crop, flip, rotation, jitter, erasing), shift, light, none
    label_smoothing: float = 0.0  # on the softmax heads; 0: plain (class-weighted) cross-entropy
    flip_tta: bool = False  # the saved model predicts on each photo and its mirror image (not in validations)
    # mixed-precision training steps: CUDA, CPUs with native bf16; weights stay fp32 (evaluation predicts as the
    # worker does)
    amp: bool = True
    seed: int = 0
    threads: int | None = None  # None: the cores other processes leave idle (load average), at least 1
    workers: int = 0
    device: str = "auto"
    model_version: str | None = None
    progress: bool = True

    def stages(self) -> list[StageSpec]:
        if self.strategy == "staged":
            r, c, j = self.stage_steps
            specs = [
                StageSpec("1-retrieval", r, self.lr_retrieval, use_cls=False, use_ret=True, sampler="m_per_item",
                          schedule="step", train_cls=False, select_on="recall@1"),
                StageSpec("2-classification", c, self.lr_classification, use_cls=True, use_ret=False,
                          sampler="balanced", train_ret=False),
                # one model must both tag and retrieve: keep the joint stage's weights that do both best
                StageSpec("3-joint", j, self.lr_joint, use_cls=True, use_ret=True, sampler="m_per_item",
                          select_on="macro_f1+recall@1", warmup=self.joint_warmup,
                          trunk_lr_scale=self.joint_trunk_lr),
            ]
            return [s for s in specs if s.steps > 0]
        if self.strategy == "unified":
            return [StageSpec("unified", self.unified_steps, self.lr_unified, use_cls=True, use_ret=True,
                              sampler="m_per_item")]
        raise RuntimeError(f"Invalid strategy {self.strategy!r}. Only {', '.join(STRATEGIES)} are supported.")


# Presets; the measurements behind each choice are in benchmarks/RESULTS.md.
# QUICK: the quickstart's CPU budget (≥ 90 % Fashion-MNIST top-1; the whole quickstart ≤ 4 min on 2 cores). A small CNN
# from scratch at the native 28 px: in so short a budget it beats pretrained Lite0 on 28×28 garments and
# is far cheaper to serve. Batch 128: the heads cost a fixed time per CPU step, so bigger batches see
# more images in the budget. Nearly all of the budget goes to classification, with no augmentation on
# top of the shop photos' own variation (in a few passes it only slows fitting). The classification
# steps are what bf16 autocast (``amp``) fits in the budget; without native bf16 the budget ends them
# earlier. grey_photos: the model also reads the images published figures use (a renders-only model
# reads them near chance); grey_repeats stays 1 because the quickstart's listings are shop photos.
QUICK = TrainConfig(
    backbone="small_cnn", pretrained=False, image_size=28, strategy="staged", stage_steps=(60, 4800, 300),
    lr_retrieval=1e-3, lr_classification=3e-3, lr_joint=2e-4, batch_size=128, train_items=None, val_items=1000,
    test_items=None, test_photos_per_item=2, photos_per_item=2, m_per_item=2, time_budget_s=200.0,
    patience=100, augment="none", grey_photos=True,
)
# The pretrained route: ImageNet Lite0 at 48 px, channels_last.
QUICK_LITE0 = replace(QUICK, backbone="efficientnet_lite0", pretrained=True, image_size=48, lr_classification=1e-3)
# TINY: seconds; a real trained model directory for other packages' tests.
TINY = TrainConfig(
    backbone="efficientnet_lite0", image_size=32, strategy="staged", stage_steps=(3, 3, 3), batch_size=16,
    train_items=128, val_items=64, test_items=64, photos_per_item=2, m_per_item=2, progress=False,
)
# FULL: the long staged run for the quality targets. Steps are upper bounds; give it a time budget on a
# CPU (the schedules then follow the clock). Regularised for many passes over the items
# (benchmarks/recipe_ablation.py): translation instead of the full set's resized crop, label smoothing 0.1
# and weight decay 0.05. Retrieval at 1e-4: at 1e-3 batch-hard triplets from scratch stall at the margin.
# Joint stage with λcls 1.0, not the default 0.2 (which prioritises retrieval): it trades a little R@1 for
# top-1, the right trade while top-1 is the target we miss.
FULL = TrainConfig(
    backbone="small_cnn", pretrained=False, image_size=28, strategy="staged", stage_steps=(4000, 24000, 12000),
    lr_retrieval=1e-4, lr_classification=2e-3, lr_joint=5e-4, photos_per_item=4, m_per_item=4, val_items=5000,
    eval_every=2000, patience=6, workers=1, augment="shift", label_smoothing=0.1, weight_decay=0.05,
    loss_weights=LossWeights(cls=1.0), grey_photos=True,
    # grey photos ×3 (3 of every 7 class-balanced draws, not 1 of 5): more FMNIST top-1 in fewer
    # classification steps, for a little renders top-1 and R@1
    grey_repeats=3,
    flip_tta=True,  # trained with flips: the mirror image adds top-1 and R@1 for 2× the compute
)
# FULL_GPU: the quality run on one GPU — a CIFAR-style ResNet-18 at 28 px, FULL's regularised recipe
# with augmentation on the device (BatchAugment), batch 512, minutes instead of hours. Steps are upper
# bounds; the time budget decides.
FULL_GPU = replace(
    FULL, backbone="resnet18_lowres", batch_size=512, stage_steps=(10000, 55000, 35000), eval_every=2500, patience=1000,
    time_budget_s=400.0, device="cuda", workers=8,  # workers: decoding DeepFashion files only
)
# FULL_LITE0: FULL's recipe on the pretrained route (ImageNet Lite0) for a long CPU run. 64 px, not 48:
# a step costs a third more, but in hours of training the larger input should win.
FULL_LITE0 = replace(FULL, backbone="efficientnet_lite0", pretrained=True, image_size=64, lr_classification=1e-3,
                     lr_joint=3e-4)
# FULL_GPU_LITE0: the pretrained route on one GPU, at 96 px (compute is cheap there; larger inputs suit
# ImageNet filters better).
FULL_GPU_LITE0 = replace(FULL_GPU, backbone="efficientnet_lite0", pretrained=True, image_size=96,
                         lr_classification=FULL_LITE0.lr_classification, lr_joint=FULL_LITE0.lr_joint)
# The label loss for a marketplace's own catalogue (seller tags, some wrong): `enrich train --catalogue` and
# retraining jobs on the catalogue use it unless told otherwise (benchmarks/seller_noise.py chose it).
CATALOGUE_LABEL_LOSS = "bootstrap"
PRESETS = {"quick": QUICK, "quick-lite0": QUICK_LITE0, "tiny": TINY, "full": FULL, "full-lite0": FULL_LITE0,
           "full-gpu": FULL_GPU, "full-gpu-lite0": FULL_GPU_LITE0}


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as JSON values (paths as strings, tuples as lists): what reports and checkpoints save."""
    return json.loads(json.dumps(asdict(cfg), default=str))


# Names a saved configuration may carry from before a rename, and the names they have now.
_RENAMED_KEYS = {"seed_002_task_weights": "task_weights"}
_RENAMED_VALUES = {"augment": {"seed": "full"}}
_PATH_FIELDS = ("out_dir", "data_dir", "weights_path", "init_from", "resume")


def saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration (``config_dict``'s JSON) under today's names: a renamed key or value reads as
    its new name (a key saved under both names keeps the new one's value); other keys pass unchanged."""
    out = {_RENAMED_KEYS[k]: v for k, v in saved.items() if k in _RENAMED_KEYS}
    out.update({k: v for k, v in saved.items() if k not in _RENAMED_KEYS})
    for key, renamed in _RENAMED_VALUES.items():
        value = out.get(key)
        if isinstance(value, str) and value in renamed:
            out[key] = renamed[value]
    return out


def config_from_dict(saved: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """The TrainConfig a saved configuration describes, over ``base`` (default: ``TrainConfig()``): names read
    as ``saved_config`` gives them, keys TrainConfig does not have ignored, empty paths left as ``base``'s,
    and paths, step counts and loss weights given their types back."""
    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in saved_config(saved).items() if k in known}
    for key in _PATH_FIELDS:
        if key in values:
            if values[key]:
                values[key] = Path(values[key])
            else:
                del values[key]
    if values.get("stage_steps") is not None:
        values["stage_steps"] = tuple(values["stage_steps"])
    if isinstance(values.get("loss_weights"), dict):
        values["loss_weights"] = LossWeights(**values["loss_weights"])
    return replace(base or TrainConfig(), **values)
