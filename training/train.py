"""Training: the staged multitask recipe (or the unified one) — the stages, their loop, validation,
and the run that evaluates, calibrates and saves the model (``train``). Configuration and presets:
``training.config``; data: ``training.prepare``.

Under torchrun (``training.distributed``) each process trains on its share of every global batch
(``cfg.batch_size`` is the global batch) with DistributedDataParallel averaging the gradients; validation is
shared out and gathered, so every rank sees the same figures and takes the same early-stopping decisions.
Rank 0 alone writes stage checkpoints (``<out_dir>/<version>.checkpoint.pt``, for ``cfg.resume``), the model
and its report.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.config import Settings
from model.checkpoint import load_model, save_model
from model.inference import Predictions, mixed_precision_dtype, resolve_device
from model.network import MultitaskModel, build_model
from schemas.manifest import Lineage
from schemas.taxonomy import Taxonomy, load_taxonomy
from training import distributed
from training.config import TINY, StageSpec, TrainConfig, config_dict
from training.data import (
    ImageLoader,
    LabelledImages,
    PreparedData,
    Split,
    TensorBatches,
    TorchImages,
    mask_not_applicable,
)
from training.eval_sets import eval_set_id
from training.evaluate import fashion_mnist_metrics, predict_dataset
from training.fmnist_shop import COLOUR_GROUP
from training.losses import MultitaskLoss, class_weights, pos_weights, task_weights
from training.prepare import add_training_rows, prepare_data
from training.report import write_report
from training.samplers import make_batch_sampler
from training.scores import EvalResult, calibrate, compute_metrics
from training.transforms import AUGMENTATIONS, BatchAugment, train_transform

log = logging.getLogger(__name__)

# ``train(..., progress=)`` receives dicts like {"stage": "2-classification", "step": 120, "of": 4800}
# (stages "prepare", each training stage — with "budget_s" at its start when time decides —, "test",
# "save"); it is called at most once every 20 steps.
ProgressFn = Callable[[dict], None]
_ONE_PROCESS = distributed.World()  # a run that is not under torchrun


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
    """Intra-op threads for the cores nobody else uses: on a busy machine more threads than free cores
    run slower than one, on an idle one they run faster. Measured now rather than from the load
    average, which still holds a finished neighbour for a minute."""
    cores = os.cpu_count() or 1
    idle = _idle_cores()
    free = cores if idle is None else round(idle)
    return max(1, min(cores, free - (1 if workers and cores > 2 else 0)))


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_criterion(train: LabelledImages, taxonomy: Taxonomy, cfg: TrainConfig) -> MultitaskLoss:
    exclusive = {g.name: g.exclusive for g in taxonomy.attribute_groups}
    group_w, group_pw, counts = {}, {}, {}
    for g in taxonomy.attribute_groups:
        t = train.groups[g.name]
        if g.exclusive:
            group_w[g.name] = torch.from_numpy(class_weights(t, len(g.values)))
            # weak labels (read from listing text) count by their loss weight; without any: the plain count
            counts[g.name] = (float(train.weights[g.name][t >= 0].sum()) if g.name in train.weights
                              else int((t >= 0).sum()))
        else:
            rows = train.present[g.name]
            group_pw[g.name] = torch.from_numpy(pos_weights(t[rows])) if rows.any() else None
            counts[g.name] = int(rows.sum())
    return MultitaskLoss(
        category_weight=torch.from_numpy(class_weights(train.category, len(taxonomy.categories))),
        group_weight=group_w, group_pos_weight={k: v for k, v in group_pw.items() if v is not None},
        group_task_weight={g: (task_weights(counts).get(g, 1.0) if cfg.task_weights else 1.0)
                           * cfg.group_loss_weights.get(g, 1.0) for g in counts},
        exclusive=exclusive, weights=cfg.loss_weights, label_smoothing=cfg.label_smoothing, label_loss=cfg.label_loss,
        category_type=torch.tensor([taxonomy.types.index(c.type) for c in taxonomy.categories], dtype=torch.int64),
    )


def _lr_at(spec: StageSpec, frac: float) -> float:
    frac = min(max(frac, 0.0), 1.0)
    warm = min(1.0, frac / spec.warmup) if spec.warmup > 0 else 1.0
    if spec.schedule == "step":
        return warm * (spec.lr * 0.5 ** math.floor(frac * 4 - 1e-9) if frac > 0 else spec.lr)
    eta_min = min(1e-5, spec.lr)
    return warm * (eta_min + (spec.lr - eta_min) * 0.5 * (1 + math.cos(math.pi * frac)))


def adamw(params, lr: float, weight_decay: float = 1e-4) -> torch.optim.AdamW:
    """The training optimizer. fused: one kernel over all parameters, on the CPU too (much faster
    steps than foreach)."""
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


def predict_shared(model: MultitaskModel, data: LabelledImages, image_size: int, device: torch.device,
                   world: distributed.World, loader: ImageLoader | None = None,
                   progress: bool = False) -> Predictions:
    """``predict_dataset`` on every row, each rank predicting its share; every rank gets all of them."""
    if world.size == 1 or len(data) < world.size:
        return predict_dataset(model, data, image_size, device, loader=loader, progress=progress)
    rows = np.arange(len(data))[world.shard(len(data))]
    parts = world.gather(predict_dataset(model, data.subset(rows), image_size, device, loader=loader,
                                         progress=progress))
    return Predictions(category=np.concatenate([p.category for p in parts]),
                       groups={g: np.concatenate([p.groups[g] for p in parts]) for g in parts[0].groups},
                       embedding=np.concatenate([p.embedding for p in parts]),
                       type=None if parts[0].type is None else np.concatenate([p.type for p in parts]))


def validate(model: MultitaskModel, split: Split, cfg: TrainConfig, taxonomy: Taxonomy, device: torch.device,
             loader: ImageLoader | None = None, world: distributed.World = _ONE_PROCESS
             ) -> EvalResult:
    preds = predict_shared(model, split.data, cfg.image_size, device, world, loader=loader)
    return compute_metrics(taxonomy, preds, split.data, query_mask=split.query)


def _validate_into(model: MultitaskModel, spec: StageSpec, data: PreparedData, cfg: TrainConfig,
                   device: torch.device, history: list[dict], step: int,
                   world: distributed.World) -> tuple[float, dict[str, float]]:
    world.average_buffers(model)  # each rank's BatchNorm statistics saw its share of the batches
    res = validate(model, data.val, cfg, data.taxonomy, device, data.loader, world)
    history.append({"stage": spec.name, "step": step, "val": res.metrics})
    log.info("stage %s step %d: val %s", spec.name, step,
             ", ".join(f"{k}={v:.4f}" for k, v in res.metrics.items()
                       if k in ("top1", "macro_f1", "colour/accuracy", "recall@1", "map@r")))
    # "a+b": the mean of several validation metrics
    score = float(np.mean([res.metrics.get(k, float("nan")) for k in spec.select_on.split("+")]))
    return (-math.inf if math.isnan(score) else score), res.metrics


# DDP leaves the buffers alone in the steps (newer torch renamed the switch)
_NO_BUFFER_SYNC: dict[str, Any] = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


class _TrainStep(torch.nn.Module):
    """Forward and loss as one module, so that DistributedDataParallel sees the whole graph (the condition
    masks enter the loss outside the model's forward) and finds the parameters a step leaves unused."""

    def __init__(self, model: MultitaskModel, criterion: MultitaskLoss, spec: StageSpec,
                 amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.criterion, self.spec, self.amp_dtype = model, criterion, spec, amp_dtype

    def forward(self, x: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.model(x)
        return self.criterion(out, batch, use_cls=self.spec.use_cls, use_ret=self.spec.use_ret,
                              masks=self.model.condition_masks() if self.spec.use_ret else None,
                              group_names=self.model.group_names)


def run_stage(model: MultitaskModel, spec: StageSpec, data: PreparedData, criterion: MultitaskLoss,
              cfg: TrainConfig, device: torch.device, generator: torch.Generator, budget_s: float | None,
              history: list[dict], progress: ProgressFn | None = None,
              world: distributed.World = _ONE_PROCESS, rows_used: np.ndarray | None = None
              ) -> dict[str, float]:
    """Train one stage; returns the best validation's metrics (its weights are the model's at the end).
    ``rows_used``: counts of the training rows this rank trained on, added to."""
    params = _set_trainable(model, spec, set(model.frozen_backbone))
    trunk = {id(p) for p in model.backbone.parameters()}
    groups = [{"params": [p for p in params if id(p) in trunk], "lr_scale": spec.trunk_lr_scale},
              {"params": [p for p in params if id(p) not in trunk], "lr_scale": 1.0}]
    opt = adamw([g for g in groups if g["params"]], spec.lr, cfg.weight_decay)
    cuda = device.type == "cuda"
    amp_dtype = mixed_precision_dtype(device, training=True, model=model) if cfg.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
    colour_jitter = (cfg.colour_jitter if cfg.colour_jitter is not None
                     else COLOUR_GROUP not in data.taxonomy.group_names)
    batches = make_batch_sampler(spec.sampler, labels=data.train.category, item_ids=data.train.item_ids,
                                 num_classes=len(data.taxonomy.categories), batch_size=cfg.batch_size,
                                 m=cfg.m_per_item, generator=generator, labelled=data.train.labelled(),
                                 classification=spec.use_cls, rank=world.rank, world=world.size)
    step_fn: torch.nn.Module = _TrainStep(model, criterion, spec, amp_dtype)
    if world.size > 1:  # gradients averaged over the ranks; BatchNorm statistics averaged at validations
        step_fn = DistributedDataParallel(step_fn, device_ids=[device.index] if cuda else None,
                                          find_unused_parameters=True, **_NO_BUFFER_SYNC)
    if data.loader is None and data.train.images.dtype == np.uint8:  # in memory: augment whole batches
        # each rank augments its share with draws of its own
        aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + len(history) + 7919 * world.rank)
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
            values = world.mean_(torch.stack([v for _, _, v in pending]).float()).tolist()  # the global figures
            history.extend({"stage": spec.name, "step": st, "lr": lr, **dict(zip(part_names, vals, strict=True))}
                           for (st, lr, _), vals in zip(pending, values, strict=True))
            bar.set_postfix(loss=f"{np.mean([h['total'] for h in history[-len(pending):]]):.4f}")
            pending.clear()
    for step in range(1, spec.steps + 1):
        frac = (step - 1) / spec.steps
        if budget_s is not None:  # the schedule follows whichever runs out first: steps or time
            # the slowest rank's clock: every rank must follow the same schedule and stop at the same step
            frac = world.max(max(frac, (time.perf_counter() - t0) / budget_s))
            if frac >= 1.0:
                log.info("stage %s: time budget %.0fs reached after %d/%d steps", spec.name, budget_s, step - 1,
                         spec.steps)
                break
        for g in opt.param_groups:
            g["lr"] = _lr_at(spec, frac) * g["lr_scale"]
        _set_modes(model, spec)
        batch = next(it)
        if rows_used is not None:
            np.add.at(rows_used, batches.taken.popleft(), 1)
        x = batch["image"].to(device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
        batch = {k: (v.to(device, non_blocking=cuda) if torch.is_tensor(v) else v) for k, v in batch.items()}
        loss, parts = step_fn(x, batch)
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
            if progress is not None:
                progress({"stage": spec.name, "step": step, "of": spec.steps})
        validated_now = False
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == spec.steps:
            read_losses()
            validated_now = True
            score, metrics = _validate_into(model, spec, data, cfg, device, history, step, world)
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
        score, metrics = _validate_into(model, spec, data, cfg, device, history, done, world)
        if score > best_score or best_state is None:
            best_score, best_metrics, best_state = score, metrics, None
    if best_state is not None:  # the best validation's weights (may be the final ones)
        model.load_state_dict(best_state)
    log.info("stage %s done in %.1fs, best %s=%.4f", spec.name, time.perf_counter() - t0, spec.select_on, best_score)
    return best_metrics


def train(config: TrainConfig, extra_train: LabelledImages | None = None,
          progress: ProgressFn | None = None, settings: Settings | None = None) -> Path:
    """Train, evaluate, calibrate and save. Returns the model directory (model.safetensors,
    manifest.json, report/). ``extra_train``: more labelled rows for the training split only, e.g.
    human corrections (``training.corrections``); validation and test stay the fixed sets.
    ``progress``: called with where the run is (``ProgressFn``), e.g. to show a retraining job's progress.
    ``settings``: where the dataset needs them (the catalogue's database and image loader: training.prepare).
    Started by torchrun, this is one rank of a DistributedDataParallel run (``training.distributed``): every
    rank returns the same directory, rank 0 alone writes it and reports progress."""
    threads = torch.get_num_threads()
    try:
        with distributed.process_group(config.device) as world:
            return _train(config, extra_train, progress if world.main else None, world, settings)
    finally:
        torch.set_num_threads(threads)  # the caller's process (e.g. the quickstart) keeps its setting


def checkpoint_path(out_dir: Path, version: str) -> Path:
    """Where a run writes its stage checkpoint (removed once the model is saved)."""
    return Path(out_dir) / f"{version}.checkpoint.pt"


# what must not change between a checkpoint and the run that resumes from it
_RESUME_FIELDS = ("dataset", "taxonomy", "backbone", "image_size", "embedding_dim", "strategy", "stage_steps",
                  "unified_steps", "batch_size", "m_per_item", "seed")


def _load_checkpoint(cfg: TrainConfig, path: Path) -> dict:
    """The checkpoint ``path`` (``cfg.resume``), if ``cfg`` may go on from it."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved, now = ckpt["config"], config_dict(cfg)
    differ = [k for k in _RESUME_FIELDS if saved.get(k) != now.get(k)]
    if differ:
        raise RuntimeError(f"cannot resume from {cfg.resume}: it was trained with other "
                           + ", ".join(f"{k} ({saved.get(k)!r}, not {now.get(k)!r})" for k in differ))
    return ckpt


def _stage_seed(cfg: TrainConfig, stage: int, rank: int) -> int:
    # dropout and the like: fresh per stage (a resumed run draws as an uninterrupted one), distinct per rank
    return int(np.random.SeedSequence([cfg.seed, stage, rank]).generate_state(1)[0])


def _train(config: TrainConfig, extra_train: LabelledImages | None = None,
           progress: ProgressFn | None = None, world: distributed.World = _ONE_PROCESS,
           settings: Settings | None = None) -> Path:
    cfg = config
    report = progress or (lambda _: None)
    if cfg.augment not in AUGMENTATIONS:  # before minutes of data preparation, not after
        raise RuntimeError(f"Invalid augmentation {cfg.augment!r}. Only {', '.join(AUGMENTATIONS)} are supported.")
    if cfg.flip_tta and cfg.augment == "none":  # test-time flips only pay for a model trained with them
        raise RuntimeError("flip_tta needs a model trained with flips; augmentation 'none' has none")
    t_start = time.perf_counter()
    ckpt = _load_checkpoint(cfg, cfg.resume) if cfg.resume is not None else None
    # corrections received after this are held out from the model
    started_at = datetime.fromisoformat(ckpt["started_at"]) if ckpt else datetime.now(UTC)
    # one version for all ranks (their clocks may straddle a second)
    version = world.broadcast(ckpt["version"] if ckpt else cfg.model_version or
                              f"{cfg.taxonomy}-{cfg.backbone}-{cfg.strategy}-{started_at:%Y%m%dT%H%M%S}")
    # several processes on one machine's CPU share its idle cores
    torch.set_num_threads(cfg.threads or max(1, auto_threads(cfg.workers) // world.local_size))
    generator = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        if world.size > 1:
            device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (training.distributed)
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    taxonomy = load_taxonomy(cfg.taxonomy)
    report({"stage": "prepare"})
    data = prepare_data(cfg, taxonomy, settings)
    n_extra = len(extra_train) if extra_train is not None else 0
    if extra_train is not None and n_extra:
        data.train = mask_not_applicable(add_training_rows(data.train, extra_train, cfg.correction_repeats),
                                         taxonomy)
        log.info("training set: %d extra row(s) ×%d added (%d in all)", n_extra, cfg.correction_repeats,
                 len(data.train))
    fingerprint = data.train.fingerprint()
    if len(set(world.gather(fingerprint))) > 1:  # the shares of a batch would not be one batch
        raise RuntimeError("the processes of this run prepared different training data")
    if ckpt and ckpt["data_fingerprint"] != fingerprint:
        raise RuntimeError(f"cannot resume from {cfg.resume}: the training data changed since (e.g. new "
                           "corrections); start a new run")
    model = build_model(cfg.backbone, taxonomy, pretrained=cfg.pretrained, weights_path=cfg.weights_path,
                        embedding_dim=cfg.embedding_dim)
    started_from = ckpt["started_from"] if ckpt else ""
    if cfg.init_from is not None and ckpt is None:  # warm start: same backbone and taxonomy (the manifest is checked)
        start, manifest = load_model(cfg.init_from, expected_taxonomy=taxonomy)
        started_from = manifest.model_version
        if manifest.backbone != cfg.backbone:
            raise RuntimeError(f"cannot start a {cfg.backbone} model from {cfg.init_from} ({manifest.backbone})")
        # a start without a type head leaves the new head as initialised
        model.load_state_dict(start.state_dict(), strict=start.type_head is not None)
        log.info("starting from the weights of %s (%s)", manifest.model_version, cfg.init_from)
    history: list[dict] = []
    stage_metrics: dict[str, dict[str, float]] = {}
    spent = 0.0
    if ckpt:  # every rank loads the same checkpoint
        model.load_state_dict(ckpt["model"])
        generator.set_state(ckpt["generator"])
        history, stage_metrics, spent = ckpt["history"], ckpt["stage_metrics"], float(ckpt["train_seconds"])
        log.info("rank %d resumed %s from %s: stages %s done", world.rank, version, cfg.resume,
                 ", ".join(stage_metrics))
    model.freeze_backbone_layers(multitask=True)
    model = model.to(device).to(memory_format=torch.channels_last)
    criterion = build_criterion(data.train, taxonomy, cfg).to(device)
    stages = cfg.stages()
    rows_used = np.zeros(len(data.train), np.int64)  # what this rank trained on (report/rows_used.npz)
    t_prepared = time.perf_counter()
    t_train = t_prepared - spent  # the budget is for training: data preparation is not in it
    total_steps = sum(s.steps for s in stages if s.name not in stage_metrics)
    for index, spec in enumerate(stages):
        if spec.name in stage_metrics:
            continue  # done before the checkpoint this run resumed from
        budget = None
        if cfg.time_budget_s is not None:
            budget = max(1.0, (cfg.time_budget_s - spent) * spec.steps / max(1, total_steps))
        report({"stage": spec.name, "step": 0, "of": spec.steps,
                **({"budget_s": round(budget, 1)} if budget is not None else {})})
        torch.manual_seed(_stage_seed(cfg, index, world.rank))
        stage_metrics[spec.name] = run_stage(model, spec, data, criterion, cfg, device, generator, budget, history,
                                             progress, world, rows_used)
        total_steps -= spec.steps
        spent = time.perf_counter() - t_train
        world.average_buffers(model)
        if world.main:
            _save_checkpoint(checkpoint_path(cfg.out_dir, version), model, cfg, version=version,
                             started_at=started_at, started_from=started_from, fingerprint=fingerprint,
                             generator=generator, history=history, stage_metrics=stage_metrics, spent=spent)
    train_s = time.perf_counter() - t_train
    # DistributedDataParallel keeps the ranks' weights equal: a broken run otherwise
    if world.size > 1 and len(set(world.gather(_weights_digest(model)))) > 1:
        raise RuntimeError("the processes of this run ended with different weights")
    prepare_s = t_prepared - t_start

    model.flip_tta = cfg.flip_tta
    model.shelf_category_weight = cfg.shelf_category_weight
    report({"stage": "test"})
    # calibrate on validation, then measure on test with those thresholds (each rank predicts its share)
    val_preds = predict_shared(model, data.val.data, cfg.image_size, device, world, loader=data.loader)
    test_preds = predict_shared(model, data.test.data, cfg.image_size, device, world, loader=data.loader,
                                progress=cfg.progress)
    used = world.gather(rows_used)
    out_dir = Path(cfg.out_dir) / version
    if not world.main:
        return out_dir
    thresholds, label_thresholds = calibrate(taxonomy, val_preds, data.val.data)
    test = compute_metrics(taxonomy, test_preds, data.test.data, label_thresholds, query_mask=data.test.query,
                           shelf_category_weight=model.shelf_category_weight)
    metrics = {f"test/{k}": v for k, v in test.metrics.items() if not math.isnan(v)}
    if data.plain_test is not None and data.grey_test is not None:
        metrics.update(fashion_mnist_metrics(model, test_preds, data.test, data.plain_test, data.grey_test,
                                             cfg.image_size, device))
    metrics["train_seconds"] = train_s  # the stages, validations included
    metrics["prepare_seconds"] = prepare_s  # data and model construction
    # which fixed evaluation set these are: the registry compares models only on the same one
    metrics["eval/seed"] = float(cfg.seed)
    metrics["eval/test_rows"] = float(len(data.test.data))
    metrics["eval/test_photos_per_item"] = float(cfg.test_photos_per_item)
    report({"stage": "save"})
    save_model(model, out_dir, model_version=version, image_size=cfg.image_size, thresholds=thresholds,
               label_thresholds=label_thresholds, metrics=metrics, data_fingerprint=fingerprint,
               strategy=cfg.strategy, dataset=cfg.dataset, eval_set=eval_set_id(cfg, taxonomy, data.test),
               lineage=Lineage(started_from=started_from, started_at=started_at, extra_rows=n_extra))
    write_report(out_dir / "report", taxonomy=taxonomy,
                 config={**config_dict(cfg), "model_version": version, "extra_training_rows": n_extra,
                         "processes": world.size},
                 metrics=metrics,
                 stage_metrics=stage_metrics, history=history, test=test)
    # how often each process trained on each training row (this run's stages, not those before a resume)
    np.savez_compressed(out_dir / "report" / "rows_used.npz", **{f"rank{r}": u for r, u in enumerate(used)})
    checkpoint_path(cfg.out_dir, version).unlink(missing_ok=True)
    log.info("model %s saved to %s (%.1fs): %s", version, out_dir, time.perf_counter() - t_start,
             ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return out_dir


def _weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save_checkpoint(path: Path, model: MultitaskModel, cfg: TrainConfig, *, version: str, started_at: datetime,
                     started_from: str, fingerprint: str, generator: torch.Generator, history: list[dict],
                     stage_metrics: dict, spent: float) -> None:
    """After a stage: what a run needs to go on from here (``TrainConfig.resume``). Written whole, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"version": version, "started_at": started_at.isoformat(), "started_from": started_from,
                "config": config_dict(cfg), "data_fingerprint": fingerprint,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "generator": generator.get_state(), "history": history, "stage_metrics": stage_metrics,
                "train_seconds": spent}, tmp)
    tmp.replace(path)
    log.info("stages %s done: checkpoint %s (resume from it with --resume)", ", ".join(stage_metrics), path)


def train_tiny(out_dir: Path | str, fmnist_dir: Path | str, **overrides) -> Path:
    """A real (barely) trained model directory in seconds, for tests elsewhere in the project."""
    cfg = replace(TINY, out_dir=Path(out_dir), data_dir=Path(fmnist_dir), model_version="tiny-test", **overrides)
    return train(cfg)

