"""Training: seed 000's staged multitask recipe (or the unified one) — the stages, their loop, validation,
and the run that evaluates, calibrates and saves the model (``train``). Configuration and presets:
``training.config``; data: ``training.prepare``.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.checkpoint import load_model, save_model
from model.inference import mixed_precision_dtype, resolve_device
from model.network import MultitaskModel, build_model
from schemas.manifest import Lineage
from schemas.taxonomy import Taxonomy, load_taxonomy
from training.config import TINY, StageSpec, TrainConfig, config_dict
from training.data import LabelledImages, PreparedData, Split, TensorBatches, TorchImages, mask_not_applicable
from training.evaluate import (EvalResult, calibrate, compute_metrics, eval_set_id, fashion_mnist_metrics,
                               predict_dataset)
from training.fmnist_shop import COLOUR_GROUP
from training.losses import MultitaskLoss, class_weights, pos_weights, task_weights
from training.prepare import add_training_rows, prepare_data
from training.report import write_report
from training.samplers import make_batch_sampler
from training.transforms import AUGMENTATIONS, BatchAugment, train_transform

log = logging.getLogger(__name__)

# ``train(..., progress=)`` receives dicts like {"stage": "2-classification", "step": 120, "of": 4800}
# (stages "prepare", each training stage — with "budget_s" at its start when time decides —, "test",
# "save"); it is called at most once every 20 steps.
ProgressFn = Callable[[dict], None]


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
            # weak labels (seed 003) count by their loss weight; without any: the plain count
            counts[g.name] = (float(train.weights[g.name][t >= 0].sum()) if g.name in train.weights
                              else int((t >= 0).sum()))
        else:
            rows = train.present[g.name]
            group_pw[g.name] = torch.from_numpy(pos_weights(t[rows])) if rows.any() else None
            counts[g.name] = int(rows.sum())
    return MultitaskLoss(
        category_weight=torch.from_numpy(class_weights(train.category, len(taxonomy.categories))),
        group_weight=group_w, group_pos_weight={k: v for k, v in group_pw.items() if v is not None},
        group_task_weight={g: (task_weights(counts).get(g, 1.0) if cfg.seed_002_task_weights else 1.0)
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
              history: list[dict], progress: ProgressFn | None = None) -> dict[str, float]:
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
            if progress is not None:
                progress({"stage": spec.name, "step": step, "of": spec.steps})
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


def train(config: TrainConfig, extra_train: LabelledImages | None = None,
          progress: ProgressFn | None = None) -> Path:
    """Train, evaluate, calibrate and save. Returns the model directory (model.safetensors,
    manifest.json, report/). ``extra_train``: more labelled rows for the training split only, e.g.
    human corrections (``training.corrections``); validation and test stay the fixed sets.
    ``progress``: called with where the run is (``ProgressFn``), e.g. to show a retraining job's progress."""
    threads = torch.get_num_threads()
    try:
        return _train(config, extra_train, progress)
    finally:
        torch.set_num_threads(threads)  # the caller's process (e.g. the quickstart) keeps its setting


def _train(config: TrainConfig, extra_train: LabelledImages | None = None,
           progress: ProgressFn | None = None) -> Path:
    cfg = config
    report = progress or (lambda _: None)
    if cfg.augment not in AUGMENTATIONS:  # before minutes of data preparation, not after
        raise RuntimeError(f"Invalid augmentation {cfg.augment!r}. Only {', '.join(AUGMENTATIONS)} are supported.")
    if cfg.flip_tta and cfg.augment == "none":  # test-time flips only pay for a model trained with them
        raise RuntimeError("flip_tta needs a model trained with flips; augmentation 'none' has none")
    t_start = time.perf_counter()
    started_at = datetime.now(timezone.utc)  # corrections received after this are held out from the model
    torch.set_num_threads(cfg.threads or auto_threads(cfg.workers))
    generator = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    taxonomy = load_taxonomy(cfg.taxonomy)
    report({"stage": "prepare"})
    data = prepare_data(cfg, taxonomy)
    n_extra = len(extra_train) if extra_train is not None else 0
    if n_extra:
        data.train = mask_not_applicable(add_training_rows(data.train, extra_train, cfg.correction_repeats),
                                         taxonomy)
        log.info("training set: %d extra row(s) ×%d added (%d in all)", n_extra, cfg.correction_repeats,
                 len(data.train))
    model = build_model(cfg.backbone, taxonomy, pretrained=cfg.pretrained, weights_path=cfg.weights_path,
                        embedding_dim=cfg.embedding_dim)
    started_from = ""
    if cfg.init_from is not None:  # warm start: same backbone and taxonomy (the manifest is checked)
        start, manifest = load_model(cfg.init_from, expected_taxonomy=taxonomy)
        started_from = manifest.model_version
        if manifest.backbone != cfg.backbone:
            raise RuntimeError(f"cannot start a {cfg.backbone} model from {cfg.init_from} ({manifest.backbone})")
        # a start without a type head leaves the new head as initialised
        model.load_state_dict(start.state_dict(), strict=start.type_head is not None)
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
        report({"stage": spec.name, "step": 0, "of": spec.steps,
                **({"budget_s": round(budget, 1)} if budget is not None else {})})
        stage_metrics[spec.name] = run_stage(model, spec, data, criterion, cfg, device, generator, budget, history,
                                             progress)
        total_steps -= spec.steps
        spent = time.perf_counter() - t_train
    train_s = time.perf_counter() - t_train
    prepare_s = t_train - t_start

    model.flip_tta = cfg.flip_tta
    model.shelf_category_weight = cfg.shelf_category_weight
    report({"stage": "test"})
    # calibrate on validation, then measure on test with those thresholds
    val_preds = predict_dataset(model, data.val.data, cfg.image_size, device, loader=data.loader)
    thresholds, label_thresholds = calibrate(taxonomy, val_preds, data.val.data)
    test_preds = predict_dataset(model, data.test.data, cfg.image_size, device, loader=data.loader,
                                 progress=cfg.progress)
    test = compute_metrics(taxonomy, test_preds, data.test.data, label_thresholds, query_mask=data.test.query,
                           shelf_category_weight=model.shelf_category_weight)
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
    report({"stage": "save"})
    save_model(model, out_dir, model_version=version, image_size=cfg.image_size, thresholds=thresholds,
               label_thresholds=label_thresholds, metrics=metrics, data_fingerprint=data.train.fingerprint(),
               strategy=cfg.strategy, dataset=cfg.dataset, eval_set=eval_set_id(cfg, taxonomy, data.test),
               lineage=Lineage(started_from=started_from, started_at=started_at, extra_rows=n_extra))
    write_report(out_dir / "report", taxonomy=taxonomy,
                 config={**config_dict(cfg), "model_version": version, "extra_training_rows": n_extra},
                 metrics=metrics,
                 stage_metrics=stage_metrics, history=history, test=test)
    log.info("model %s saved to %s (%.1fs): %s", version, out_dir, time.perf_counter() - t_start,
             ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return out_dir


def train_tiny(out_dir: Path | str, fmnist_dir: Path | str, **overrides) -> Path:
    """A real (barely) trained model directory in seconds, for tests elsewhere in the project."""
    cfg = replace(TINY, out_dir=Path(out_dir), data_dir=Path(fmnist_dir), model_version="tiny-test", **overrides)
    return train(cfg)

