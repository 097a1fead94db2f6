"""Training: seed 000's staged multitask recipe (or the unified one), presets, and the entry point.

Stages (strategy ``staged``): 1 retrieval only (triplet, classification heads frozen), 2 classification
with the retrieval head frozen, 3 joint fine-tuning with λcls 0.2 / λret 1.0. Strategy ``unified``
trains everything at once from the start (the seed's weaker variant, kept for the comparison).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from schemas.taxonomy import Taxonomy, load_taxonomy
from model.checkpoint import save_model
from training.data import LabelledImages, TensorBatches, TorchImages, from_shop
from training.evaluate import EvalResult, calibrate, compute_metrics, fashion_mnist_metrics, predict_dataset
from training.fmnist import load_fashion_mnist
from training.fmnist_shop import COLOUR_GROUP, build_shop, grey_photos
from model.inference import mixed_precision_dtype, resolve_device
from training.losses import LossWeights, MultitaskLoss, class_weights, pos_weights, task_weights
from model.network import MultitaskModel, build_model
from training.samplers import make_batch_sampler
from training.transforms import AUGMENTATIONS, BatchAugment, train_transform

log = logging.getLogger(__name__)

STRATEGIES = ("staged", "unified")


@dataclass
class StageSpec:
    name: str
    steps: int
    lr: float
    use_cls: bool
    use_ret: bool
    sampler: str  # "m_per_item" (triplet batches) or "balanced" (WeightedRandomSampler)
    schedule: str = "cosine"  # "cosine" (to 1e-5) or "step" (halve at each quarter: seed's StepLR 5 of 20)
    train_cls: bool = True
    train_ret: bool = True
    select_on: str = "macro_f1"  # validation metric for early stopping / best checkpoint
    warmup: float = 0.0  # fraction of the stage over which the lr rises linearly from 0 to its schedule
    trunk_lr_scale: float = 1.0  # the backbone's lr relative to the heads'


@dataclass
class TrainConfig:
    out_dir: Path = Path(".enrich/models")
    dataset: str = "fmnist-shop"  # or "deepfashion"
    data_dir: Path = Path("/usr/share/datasets/fashion-mnist")
    taxonomy: str = "fashion-mnist"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights_path: Path | None = None
    init_from: Path | None = None  # a saved model directory to start from (all weights), e.g. the active model
    image_size: int = 48
    embedding_dim: int = 256
    strategy: str = "staged"
    stage_steps: tuple[int, int, int] = (3000, 3000, 6000)  # staged: retrieval, classification, joint
    unified_steps: int = 12000
    lr_retrieval: float = 1e-4  # seed 000: retrieval AdamW 1e-4, StepLR
    lr_classification: float = 1e-3  # seed 000: classification AdamW 1e-3, cosine
    lr_joint: float = 3e-4
    lr_unified: float = 1e-3
    # The joint stage costs top-1 (FULL_LITE0: renders 0.930 → 0.919 in its first 2k steps). Two knobs for it,
    # off in every preset: measured (recipe_ablation.py --stage joint) they trade R@1 for top-1, no free win.
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
    seed_002_task_weights: bool = False  # per-group weights from label counts (noisy seller labels)
    correction_repeats: int = 4  # human-corrected rows count this many times (the cleanest labels we have)
    # Fixed per-group loss factors. Colour is learnt from raw pixel statistics within a few steps and
    # its gradients swamp the category's: with weight 1 the category loss stayed at chance (2.3) for
    # 60 steps while colour converged; with 0.1 category learns as fast as alone (measured, small CNN).
    group_loss_weights: dict[str, float] = field(default_factory=lambda: {"colour": 0.1})
    colour_jitter: bool | None = None  # None: off when the taxonomy predicts colour
    augment: str = "seed"  # seed (seed 000's full set), shift, light, none (training.transforms)
    label_smoothing: float = 0.0  # on the softmax heads; 0 is seed 000's plain weighted CE
    flip_tta: bool = False  # the saved model predicts on each photo and its mirror image (not in validations)
    amp: bool = True  # mixed-precision training steps: CUDA, CPUs with native bf16; weights stay fp32 (evaluation predicts as the worker does)
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


# Presets. QUICK: the quickstart's CPU budget (≥ 90 % Fashion-MNIST top-1 in ≤ 5 minutes on 2 cores).
# A small CNN from scratch at the native 28 px beats pretrained Lite0 at 48 px in so short a budget on
# 28×28 garments (ENVIRONMENT.md: 92.0 % vs 90.5 % in 4 min) and is ~10× cheaper to serve. Batch 128
# (not 64): the seed's MLP heads cost a fixed ~11 ms per CPU step, so bigger batches see more images in
# the budget (1960 vs 1500 img/s). Nearly all of the budget goes to classification. No augmentation on
# top of the shop photos' own variation: in under 4 passes it only slows fitting (90.4 % vs 88.9 % with
# the light crop + flip, measured here). 4800 classification steps: what bf16 autocast (``amp``) fits in
# the time 3500 fp32 steps took; on a CPU without native bf16 the time budget ends it earlier.
# grey_photos: each item's grey Fashion-MNIST image beside its renders, so the model also reads the
# images published figures use: 92.1 % on them, renders 90.9 % (R@1 0.28, was 0.37: the joint stage's
# triplet batches now alternate with class-balanced ones); a renders-only model reads them near chance.
# grey_repeats stays 1 here: ×4 gave grey 0.922 vs 0.916 but renders 0.893 vs 0.903 and R@1 0.23 vs 0.28
# (one run each), and the quickstart's listings are shop photos.
QUICK = TrainConfig(
    backbone="small_cnn", pretrained=False, image_size=28, strategy="staged", stage_steps=(60, 4800, 300),
    lr_retrieval=1e-3, lr_classification=3e-3, lr_joint=2e-4, batch_size=128, train_items=None, val_items=1000,
    test_items=None, test_photos_per_item=2, photos_per_item=2, m_per_item=2, time_budget_s=265.0,
    patience=100, augment="none", grey_photos=True,
)
# The measured pretrained route: ImageNet Lite0 at 48 px, channels_last.
QUICK_LITE0 = replace(QUICK, backbone="efficientnet_lite0", pretrained=True, image_size=48, lr_classification=1e-3)
# TINY: seconds; a real trained model directory for other packages' tests.
TINY = TrainConfig(
    backbone="efficientnet_lite0", image_size=32, strategy="staged", stage_steps=(3, 3, 3), batch_size=16,
    train_items=128, val_items=64, test_items=64, photos_per_item=2, m_per_item=2, progress=False,
)
# FULL: the long staged run for the quality targets. Steps are upper bounds; give it a time budget on a
# CPU (the schedules then follow the clock). Regularised for many passes over the items (measured with
# benchmarks/recipe_ablation.py, classification stage, small CNN, 80 passes over 8 000 items, two
# seeds): translation instead of the seed's resized crop, label smoothing 0.1 and weight decay 0.05 gave
# +1.0 to +1.2 points of top-1 over seed 000's augmentation with plain CE. Retrieval at seed 000's
# 1e-4: at 1e-3 batch-hard triplets from scratch stall at the margin (R@1 0.14 vs 0.31 after 600 steps
# of 512; the first GPU run's stage 1 ended at 0.07). Joint stage with λcls 1.0, not the seed's 0.2
# (which "prioritises retrieval"): from the same stage-2 weights, renders top-1 0.8865 → 0.902 for R@1
# 0.697 → 0.682 (recipe_ablation.py --stage joint) — the right trade while top-1 is the target we miss.
FULL = TrainConfig(
    backbone="small_cnn", pretrained=False, image_size=28, strategy="staged", stage_steps=(4000, 24000, 12000),
    lr_retrieval=1e-4, lr_classification=2e-3, lr_joint=5e-4, photos_per_item=4, m_per_item=4, val_items=5000,
    eval_every=2000, patience=6, workers=1, augment="shift", label_smoothing=0.1, weight_decay=0.05,
    loss_weights=LossWeights(cls=1.0), grey_photos=True,
    # grey photos ×3 (3 of every 7 class-balanced draws, not 1 of 5): on FULL_LITE0, 6000 s, 2 cores,
    # FMNIST top-1 0.933 → 0.938 in 27 % fewer classification steps; renders 0.926 → 0.923, R@1 0.71 → 0.67
    grey_repeats=3,
    flip_tta=True,  # trained with flips; on this preset's CPU model: top-1 +0.15 pt, R@1 +4.5 pt, 2× the compute
)
# FULL_GPU: the quality run on one GPU — a CIFAR-style ResNet-18 at 28 px, FULL's regularised recipe
# with augmentation on the device (BatchAugment), batch 512, minutes instead of hours. Steps are upper
# bounds; the time budget decides.
FULL_GPU = replace(
    FULL, backbone="resnet18_lowres", batch_size=512, stage_steps=(10000, 55000, 35000), eval_every=2500, patience=1000,
    time_budget_s=400.0, device="cuda", workers=8,  # workers: decoding DeepFashion files only
)
# FULL_LITE0: FULL's recipe on the pretrained route (ImageNet Lite0) for a long CPU run. 64 px, not 48:
# a step costs 1.33× more (274 vs 206 ms per batch of 64, 2 cores, benchmarks/train_step.py) and the
# reference runs lost only 0.5 pt to 48 px in 4 min with 0.6× the images, so in hours 64 px should win.
# Measured (7500 s budget, 2 cores): renders top-1 0.921, colour EM 1.000, R@1 0.819 (small-CNN FULL: 0.901);
# with grey_photos (6600 s, a slower 2-core Xeon): FMNIST top-1 0.933, renders 0.926, colour 1.000, R@1 0.713;
# with grey_repeats=3 (6000 s, the same Xeon): FMNIST top-1 0.938, renders 0.923, colour 1.000, R@1 0.667.
# On a 2-core Zen 5 EPYC (5700 s; 2.4× the classification steps): FMNIST top-1 0.9415, renders 0.929, R@1 0.733 —
# stage-2 validation only +0.3 pt for 2.4× the steps: this model at 64 px has plateaued on a CPU budget.
FULL_LITE0 = replace(FULL, backbone="efficientnet_lite0", pretrained=True, image_size=64, lr_classification=1e-3,
                     lr_joint=3e-4)
# FULL_GPU_LITE0: the pretrained route on one GPU, at 96 px (compute is cheap there; larger inputs suit
# ImageNet filters better). Unmeasured on a GPU yet.
FULL_GPU_LITE0 = replace(FULL_GPU, backbone="efficientnet_lite0", pretrained=True, image_size=96,
                         lr_classification=FULL_LITE0.lr_classification, lr_joint=FULL_LITE0.lr_joint)
PRESETS = {"quick": QUICK, "quick-lite0": QUICK_LITE0, "tiny": TINY, "full": FULL, "full-lite0": FULL_LITE0,
           "full-gpu": FULL_GPU, "full-gpu-lite0": FULL_GPU_LITE0}


@dataclass
class Split:
    data: LabelledImages
    query: np.ndarray  # (N,) bool: query photos (the rest is gallery) for retrieval metrics


@dataclass
class PreparedData:
    taxonomy: Taxonomy
    train: LabelledImages
    val: Split
    test: Split
    loader: object = None  # image loader for path-based datasets (DeepFashion)
    plain_test: np.ndarray | None = None  # rows of test that are the plain rendering of each test image
    grey_test: LabelledImages | None = None  # the test images as published (Fashion-MNIST's own benchmark)


def _idle_cores(window_s: float = 0.5) -> float | None:
    """Cores nobody is using right now, from two reads of /proc/stat (None off Linux)."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])  # idle + iowait, total (jiffies)
    try:
        idle0, total0 = read()
        time.sleep(window_s)
        idle1, total1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (idle1 - idle0) / max(1, total1 - total0)


def auto_threads(workers: int = 0) -> int:
    """Intra-op threads for the cores nobody else uses: on a busy 2-core machine two threads run
    2-3× slower than one (measured here), on an idle one two are ~2× faster than one. Measured now
    rather than from the load average, which still holds a finished neighbour for a minute."""
    cores = os.cpu_count() or 1
    idle = _idle_cores()
    free = cores if idle is None else round(idle)
    return max(1, min(cores, free - (1 if workers and cores > 2 else 0)))


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def fmnist_shop_test(cfg: TrainConfig, taxonomy: Taxonomy) -> tuple[Split, np.ndarray, LabelledImages]:
    """The fixed evaluation set: Fashion-MNIST test items as shop photos (depends only on seed, test_items
    and test_photos_per_item, so every model is measured on the same photos). Also returns the rows
    that are the plain rendering of each test image, and the same test images as published (grey)."""
    xt, yt = load_fashion_mnist(cfg.data_dir, "test")
    idx = (np.arange(len(xt)) if cfg.test_items is None
           else np.random.default_rng(cfg.seed + 2).permutation(len(xt))[:cfg.test_items])
    test = build_shop(xt[idx], yt[idx], taxonomy, photos_per_item=cfg.test_photos_per_item, seed=cfg.seed + 2)
    grey = from_shop(grey_photos(xt[idx], yt[idx]), taxonomy)
    return Split(from_shop(test, taxonomy), test.is_query), test.is_query.copy(), grey


def prepare_fmnist_shop(cfg: TrainConfig, taxonomy: Taxonomy) -> PreparedData:
    """Train/val items from Fashion-MNIST train (disjoint), test items from Fashion-MNIST test."""
    if COLOUR_GROUP not in taxonomy.group_names:
        raise ValueError(f"fmnist-shop needs a {COLOUR_GROUP!r} attribute group in taxonomy {taxonomy.name!r}")
    x, y = load_fashion_mnist(cfg.data_dir, "train")
    order = np.random.default_rng(cfg.seed).permutation(len(x))
    val_idx = order[:cfg.val_items]
    train_idx = order[cfg.val_items:]
    if cfg.train_items is not None:
        train_idx = train_idx[:cfg.train_items]
    t0 = time.perf_counter()
    train = from_shop(build_shop(x[train_idx], y[train_idx], taxonomy, photos_per_item=cfg.photos_per_item,
                                 seed=cfg.seed), taxonomy)
    if cfg.grey_photos:
        train = add_training_rows(train, from_shop(grey_photos(x[train_idx], y[train_idx]), taxonomy),
                                  cfg.grey_repeats)
    val = build_shop(x[val_idx], y[val_idx], taxonomy, photos_per_item=2, seed=cfg.seed + 1)
    test, plain, grey = fmnist_shop_test(cfg, taxonomy)
    log.info("FMNIST-shop built in %.1fs: %d train photos (%d items%s), %d val, %d test",
             time.perf_counter() - t0, len(train), len(train_idx),
             f", +1 grey photo each ×{cfg.grey_repeats}" if cfg.grey_photos else "",
             len(val), len(test.data))
    return PreparedData(taxonomy, train, Split(from_shop(val, taxonomy), val.is_query), test, plain_test=plain,
                        grey_test=grey)


def prepare_data(cfg: TrainConfig, taxonomy: Taxonomy) -> PreparedData:
    if cfg.dataset == "fmnist-shop":
        return prepare_fmnist_shop(cfg, taxonomy)
    if cfg.dataset == "deepfashion":
        from training.deepfashion import prepare_deepfashion

        return prepare_deepfashion(cfg, taxonomy)
    raise RuntimeError(f"Invalid dataset {cfg.dataset!r}. Only 'fmnist-shop' and 'deepfashion' are supported.")


def build_criterion(train: LabelledImages, taxonomy: Taxonomy, cfg: TrainConfig) -> MultitaskLoss:
    exclusive = {g.name: g.exclusive for g in taxonomy.attribute_groups}
    group_w, group_pw, counts = {}, {}, {}
    for g in taxonomy.attribute_groups:
        t = train.groups[g.name]
        if g.exclusive:
            group_w[g.name] = torch.from_numpy(class_weights(t, len(g.values)))
            counts[g.name] = int((t >= 0).sum())
        else:
            rows = train.present[g.name]
            group_pw[g.name] = torch.from_numpy(pos_weights(t[rows])) if rows.any() else None
            counts[g.name] = int(rows.sum())
    return MultitaskLoss(
        category_weight=torch.from_numpy(class_weights(train.category, len(taxonomy.categories))),
        group_weight=group_w, group_pos_weight={k: v for k, v in group_pw.items() if v is not None},
        group_task_weight={g: (task_weights(counts).get(g, 1.0) if cfg.seed_002_task_weights else 1.0)
                           * cfg.group_loss_weights.get(g, 1.0) for g in counts},
        exclusive=exclusive, weights=cfg.loss_weights, label_smoothing=cfg.label_smoothing,
    )


def _lr_at(spec: StageSpec, frac: float) -> float:
    frac = min(max(frac, 0.0), 1.0)
    warm = min(1.0, frac / spec.warmup) if spec.warmup > 0 else 1.0
    if spec.schedule == "step":
        return warm * (spec.lr * 0.5 ** math.floor(frac * 4 - 1e-9) if frac > 0 else spec.lr)
    eta_min = min(1e-5, spec.lr)
    return warm * (eta_min + (spec.lr - eta_min) * 0.5 * (1 + math.cos(math.pi * frac)))


def adamw(params, lr: float, weight_decay: float = 1e-4) -> torch.optim.AdamW:
    """The training optimizer. fused: one kernel over all parameters, on the CPU too (2-core Xeon:
    small CNN 4.3–6.3 → 1.3 ms per step, ResNet-18 63–67 → 13 ms, against foreach)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def _set_trainable(model: MultitaskModel, spec: StageSpec, frozen_backbone: set[str]) -> list[torch.nn.Parameter]:
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen_backbone)
    for p in model.classification_parameters():
        p.requires_grad_(spec.train_cls)
    for p in model.retrieval_parameters():
        p.requires_grad_(spec.train_ret)
    return [p for p in model.parameters() if p.requires_grad]


def _set_modes(model: MultitaskModel, spec: StageSpec) -> None:
    model.train()
    if not spec.train_cls:  # frozen heads keep their BatchNorm statistics
        model.shared.eval()
    if not spec.train_ret:
        model.retrieval_head.eval()


def _batches(loader: DataLoader):
    while True:
        yield from loader


def validate(model: MultitaskModel, split: Split, cfg: TrainConfig, taxonomy: Taxonomy, device: torch.device,
             loader=None) -> EvalResult:
    preds = predict_dataset(model, split.data, cfg.image_size, device, loader=loader)
    return compute_metrics(taxonomy, preds, split.data, query_mask=split.query)


def _validate_into(model: MultitaskModel, spec: StageSpec, data: PreparedData, cfg: TrainConfig,
                   device: torch.device, history: list[dict], step: int) -> tuple[float, dict[str, float]]:
    res = validate(model, data.val, cfg, data.taxonomy, device, data.loader)
    history.append({"stage": spec.name, "step": step, "val": res.metrics})
    log.info("stage %s step %d: val %s", spec.name, step,
             ", ".join(f"{k}={v:.4f}" for k, v in res.metrics.items()
                       if k in ("top1", "macro_f1", "colour/accuracy", "recall@1", "map@r")))
    # "a+b": the mean of several validation metrics
    score = float(np.mean([res.metrics.get(k, float("nan")) for k in spec.select_on.split("+")]))
    return (-math.inf if math.isnan(score) else score), res.metrics


def run_stage(model: MultitaskModel, spec: StageSpec, data: PreparedData, criterion: MultitaskLoss,
              cfg: TrainConfig, device: torch.device, generator: torch.Generator, budget_s: float | None,
              history: list[dict]) -> dict[str, float]:
    params = _set_trainable(model, spec, set(model.frozen_backbone))
    trunk = {id(p) for p in model.backbone.parameters()}
    groups = [{"params": [p for p in params if id(p) in trunk], "lr_scale": spec.trunk_lr_scale},
              {"params": [p for p in params if id(p) not in trunk], "lr_scale": 1.0}]
    opt = adamw([g for g in groups if g["params"]], spec.lr, cfg.weight_decay)
    cuda = device.type == "cuda"
    amp_dtype = mixed_precision_dtype(device, training=True, model=model) if cfg.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
    colour_jitter = cfg.colour_jitter if cfg.colour_jitter is not None else COLOUR_GROUP not in data.taxonomy.group_names
    batches = make_batch_sampler(spec.sampler, labels=data.train.category, item_ids=data.train.item_ids,
                                 num_classes=len(data.taxonomy.categories), batch_size=cfg.batch_size,
                                 m=cfg.m_per_item, generator=generator, labelled=data.train.labelled(),
                                 classification=spec.use_cls)
    if data.loader is None and data.train.images.dtype == np.uint8:  # in memory: augment whole batches
        aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + len(history))
        augment = BatchAugment(cfg.image_size, model.mean, model.std, colour_jitter=colour_jitter,
                               level=cfg.augment, generator=aug_gen)
        it = TensorBatches(data.train, augment, device).iterate(batches)
    else:  # image files: decode and augment per image in DataLoader workers
        transform = train_transform(cfg.image_size, model.mean, model.std, colour_jitter=colour_jitter,
                                    level=cfg.augment)
        dl = DataLoader(TorchImages(data.train, transform, loader=data.loader), batch_sampler=batches,
                        num_workers=cfg.workers, pin_memory=cuda, persistent_workers=cfg.workers > 0)
        it = _batches(dl)
    best_score, best_state, best_metrics, bad_evals = -math.inf, None, {}, 0
    t0 = time.perf_counter()
    bar = tqdm(total=spec.steps, desc=f"stage {spec.name}", disable=not cfg.progress)
    pending: list[tuple[int, float, torch.Tensor]] = []  # loss parts not yet read back from the device
    part_names: list[str] = []
    done, validated_now = 0, False

    def read_losses() -> None:  # one device→host copy for many steps
        if pending:
            values = torch.stack([v for _, _, v in pending]).tolist()
            history.extend({"stage": spec.name, "step": st, "lr": lr, **dict(zip(part_names, vals))}
                           for (st, lr, _), vals in zip(pending, values))
            bar.set_postfix(loss=f"{np.mean([h['total'] for h in history[-len(pending):]]):.4f}")
            pending.clear()
    for step in range(1, spec.steps + 1):
        frac = (step - 1) / spec.steps
        if budget_s is not None:  # the schedule follows whichever runs out first: steps or time
            frac = max(frac, (time.perf_counter() - t0) / budget_s)
            if frac >= 1.0:
                log.info("stage %s: time budget %.0fs reached after %d/%d steps", spec.name, budget_s, step - 1,
                         spec.steps)
                break
        for g in opt.param_groups:
            g["lr"] = _lr_at(spec, frac) * g["lr_scale"]
        _set_modes(model, spec)
        batch = next(it)
        x = batch["image"].to(device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
        batch = {k: (v.to(device, non_blocking=cuda) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        loss, parts = criterion(out, batch, use_cls=spec.use_cls, use_ret=spec.use_ret,
                                masks=model.condition_masks() if spec.use_ret else None,
                                group_names=model.group_names)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        part_names = list(parts)
        pending.append((step, opt.param_groups[-1]["lr"], torch.stack(list(parts.values()))))
        done = step
        bar.update(1)
        if step % 20 == 0:
            read_losses()
        validated_now = False
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == spec.steps:
            read_losses()
            validated_now = True
            score, metrics = _validate_into(model, spec, data, cfg, device, history, step)
            if score > best_score:
                best_score, best_metrics, bad_evals = score, metrics, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_evals += 1
                if bad_evals >= cfg.patience:
                    log.info("stage %s: early stop at step %d (no better %s)", spec.name, step, spec.select_on)
                    break
    read_losses()
    bar.close()
    if not validated_now:  # stopped by the time budget: judge the final weights too
        score, metrics = _validate_into(model, spec, data, cfg, device, history, done)
        if score > best_score or best_state is None:
            best_score, best_metrics, best_state = score, metrics, None
    if best_state is not None:  # the best validation's weights (may be the final ones)
        model.load_state_dict(best_state)
    log.info("stage %s done in %.1fs, best %s=%.4f", spec.name, time.perf_counter() - t0, spec.select_on, best_score)
    return best_metrics


def train(config: TrainConfig, extra_train: LabelledImages | None = None) -> Path:
    """Train, evaluate, calibrate and save. Returns the model directory (model.safetensors,
    manifest.json, report/). ``extra_train``: more labelled rows for the training split only, e.g.
    human corrections (``training.corrections``); validation and test stay the fixed sets."""
    threads = torch.get_num_threads()
    try:
        return _train(config, extra_train)
    finally:
        torch.set_num_threads(threads)  # the caller's process (e.g. the quickstart) keeps its setting


def add_training_rows(train: LabelledImages, extra: LabelledImages, repeats: int) -> LabelledImages:
    """``extra`` appended ``repeats`` times. In-memory sets: its photos resized to the training photos'
    size. Sets of image files (DeepFashion): its photos join as in-memory photos among the file
    references, which the dataset's loader passes through (``training.deepfashion.load_cropped``)."""
    rows = np.tile(np.arange(len(extra)), max(1, repeats))
    if train.images.dtype != np.uint8:
        refs = np.empty(len(extra), dtype=object)
        for i, photo in enumerate(extra.images):  # one (H, W, 3) array per row, not a 4-d object array
            refs[i] = photo
        return train.concat(replace(extra, images=refs).subset(rows))
    size = train.images.shape[1:3]
    images = extra.images
    if len(images) and images.shape[1:3] != size:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
        images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return train.concat(replace(extra, images=images).subset(rows))


def _train(config: TrainConfig, extra_train: LabelledImages | None = None) -> Path:
    cfg = config
    if cfg.augment not in AUGMENTATIONS:  # before minutes of data preparation, not after
        raise RuntimeError(f"Invalid augmentation {cfg.augment!r}. Only {', '.join(AUGMENTATIONS)} are supported.")
    if cfg.flip_tta and cfg.augment == "none":  # measured: the quick model loses 0.5 pt with it
        raise RuntimeError("flip_tta needs a model trained with flips; augmentation 'none' has none")
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads or auto_threads(cfg.workers))
    generator = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    taxonomy = load_taxonomy(cfg.taxonomy)
    data = prepare_data(cfg, taxonomy)
    n_extra = len(extra_train) if extra_train is not None else 0
    if n_extra:
        data.train = add_training_rows(data.train, extra_train, cfg.correction_repeats)
        log.info("training set: %d extra row(s) ×%d added (%d in all)", n_extra, cfg.correction_repeats,
                 len(data.train))
    model = build_model(cfg.backbone, taxonomy, pretrained=cfg.pretrained, weights_path=cfg.weights_path,
                        embedding_dim=cfg.embedding_dim)
    if cfg.init_from is not None:  # warm start: same backbone and taxonomy (the manifest is checked)
        from model.checkpoint import load_model

        start, manifest = load_model(cfg.init_from, expected_taxonomy=taxonomy)
        if manifest.backbone != cfg.backbone:
            raise RuntimeError(f"cannot start a {cfg.backbone} model from {cfg.init_from} ({manifest.backbone})")
        model.load_state_dict(start.state_dict())
        log.info("starting from the weights of %s (%s)", manifest.model_version, cfg.init_from)
    model.freeze_backbone_layers(multitask=True)
    model = model.to(device).to(memory_format=torch.channels_last)
    criterion = build_criterion(data.train, taxonomy, cfg).to(device)
    stages = cfg.stages()
    history: list[dict] = []
    stage_metrics: dict[str, dict[str, float]] = {}
    t_train = time.perf_counter()  # the budget is for training: data preparation is not in it
    spent = 0.0
    total_steps = sum(s.steps for s in stages)
    for spec in stages:
        budget = None
        if cfg.time_budget_s is not None:
            budget = max(1.0, (cfg.time_budget_s - spent) * spec.steps / max(1, total_steps))
        stage_metrics[spec.name] = run_stage(model, spec, data, criterion, cfg, device, generator, budget, history)
        total_steps -= spec.steps
        spent = time.perf_counter() - t_train
    train_s = time.perf_counter() - t_train
    prepare_s = t_train - t_start

    model.flip_tta = cfg.flip_tta
    # calibrate on validation, then measure on test with those thresholds
    val_preds = predict_dataset(model, data.val.data, cfg.image_size, device, loader=data.loader)
    thresholds, label_thresholds = calibrate(taxonomy, val_preds, data.val.data)
    test_preds = predict_dataset(model, data.test.data, cfg.image_size, device, loader=data.loader,
                                 progress=cfg.progress)
    test = compute_metrics(taxonomy, test_preds, data.test.data, label_thresholds, query_mask=data.test.query)
    metrics = {f"test/{k}": v for k, v in test.metrics.items() if not math.isnan(v)}
    if data.plain_test is not None:
        metrics.update(fashion_mnist_metrics(model, test_preds, data.test, data.plain_test, data.grey_test,
                                             cfg.image_size, device))
    metrics["train_seconds"] = train_s  # the stages, validations included
    metrics["prepare_seconds"] = prepare_s  # data and model construction
    # which fixed evaluation set these are: the registry compares models only on the same one
    metrics["eval/seed"] = float(cfg.seed)
    metrics["eval/test_rows"] = float(len(data.test.data))
    metrics["eval/test_photos_per_item"] = float(cfg.test_photos_per_item)
    version = cfg.model_version or f"{cfg.taxonomy}-{cfg.backbone}-{cfg.strategy}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    out_dir = Path(cfg.out_dir) / version
    save_model(model, out_dir, model_version=version, image_size=cfg.image_size, thresholds=thresholds,
               label_thresholds=label_thresholds, metrics=metrics, data_fingerprint=data.train.fingerprint(),
               strategy=cfg.strategy)
    from training.report import write_report

    write_report(out_dir / "report", taxonomy=taxonomy,
                 config={**config_dict(cfg), "model_version": version, "extra_training_rows": n_extra},
                 metrics=metrics,
                 stage_metrics=stage_metrics, history=history, test=test)
    log.info("model %s saved to %s (%.1fs): %s", version, out_dir, time.perf_counter() - t_start,
             ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return out_dir


def config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    return json.loads(json.dumps(d, default=str))


def train_tiny(out_dir: Path | str, fmnist_dir: Path | str, **overrides) -> Path:
    """A real (barely) trained model directory in seconds, for tests elsewhere in the project."""
    cfg = replace(TINY, out_dir=Path(out_dir), data_dir=Path(fmnist_dir), model_version="tiny-test", **overrides)
    return train(cfg)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the multitask model (seed 000)")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="starting configuration (default: quick)")
    p.add_argument("--strategy", choices=STRATEGIES, help="staged or unified (default: the preset's)")
    p.add_argument("--out-dir", type=Path, help="where model directories go (default: .enrich/models)")
    p.add_argument("--data-dir", type=Path, help="Fashion-MNIST idx directory (default: Debian's)")
    p.add_argument("--time-budget", type=float, help="seconds for the whole run (default: the preset's)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    over = {k: v for k, v in {"strategy": args.strategy, "out_dir": args.out_dir, "data_dir": args.data_dir,
                               "time_budget_s": args.time_budget}.items() if v is not None}
    print(train(replace(PRESETS[args.preset], **over)))


if __name__ == "__main__":
    main()
