"""Losses and their weights: class-weighted softmax and BCE heads with groups masked where a row has no label,
per-task weights from label counts, batch-hard triplets with conditional similarity, and the type output."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners
from torch import nn

from training.config import LABEL_LOSSES, LossWeights

MISSING = -1  # target of an exclusive attribute group the sample has no label for
# Per-row losses for softmax heads (LABEL_LOSSES). "ce" plain cross-entropy; the others resist wrong labels:
# "gce" generalised cross-entropy (Zhang & Sabuncu 2018) is bounded, so a confidently wrong label cannot
# dominate; "bootstrap" (Reed et al. 2015, hard) mixes the given label with the model's own prediction;
# "small_loss" trains on the rows of a batch with the smallest losses only (co-teaching's selection).
GCE_Q = 0.7
BOOTSTRAP_BETA = 0.8
SMALL_LOSS_KEEP = 0.8  # share of each batch's labelled rows kept (the expected share of right labels)


def class_weights(labels: np.ndarray, num_classes: int, clip: tuple[float, float] = (0.5, 5.0),
                  eps: float = 1.0) -> np.ndarray:
    """Class weights: inverse class frequency, clipped to [0.5, 5], normalised to mean 1.

    Raw 1/count values are tiny, so they are first scaled to mean 1 (otherwise the clip would flatten
    every class to 0.5), then clipped, then renormalised to mean 1. Missing labels (< 0) are ignored.
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
    w = 1.0 / np.maximum(counts, eps)
    w = w / w.mean()
    w = np.clip(w, *clip)
    return (w / w.mean()).astype(np.float32)


def pos_weights(multi_hot: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """BCE positive weight per label = negatives / positives."""
    y = np.asarray(multi_hot, dtype=np.float64)
    pos = y.sum(axis=0)
    neg = y.shape[0] - pos
    return (neg / (pos + eps)).astype(np.float32)


def task_weights(label_counts: Mapping[str, float], c: float = 3.0) -> dict[str, float]:
    """Smoothed per-task loss weights: r_n = count_n / max count, w_n = max(r_n, r_avg / c).

    Tasks (attribute groups) with few labels (sparse, noisy seller tags) weigh by their share of labels, but
    at least r_avg / c: lifted instead of being drowned out.
    """
    if not label_counts:
        return {}
    top = max(label_counts.values())
    if top <= 0:
        return dict.fromkeys(label_counts, 1.0)
    ratios = {k: v / top for k, v in label_counts.items()}
    floor = float(np.mean(list(ratios.values()))) / c
    return {k: max(r, floor) for k, r in ratios.items()}


def _row_losses(logits: torch.Tensor, safe: torch.Tensor, label_loss: str, label_smoothing: float) -> torch.Tensor:
    logits = logits.float()
    if label_loss == "gce":
        p = F.softmax(logits, dim=-1).gather(1, safe[:, None]).squeeze(1)
        return (1 - p.clamp_min(1e-6) ** GCE_Q) / GCE_Q
    nll = F.cross_entropy(logits, safe, reduction="none", label_smoothing=label_smoothing)
    if label_loss == "bootstrap":
        own = F.cross_entropy(logits, logits.detach().argmax(dim=1), reduction="none")
        return BOOTSTRAP_BETA * nll + (1 - BOOTSTRAP_BETA) * own
    return nll


def _small_loss_rows(per_row: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """1 for the SMALL_LOSS_KEEP share of labelled rows with the smallest loss, else 0 (no device sync)."""
    ranked = torch.where(present > 0, per_row.detach(), torch.full_like(per_row, math.inf))
    rank = ranked.argsort().argsort()
    keep = torch.ceil(present.sum() * SMALL_LOSS_KEEP)
    return (rank < keep).float() * present


def masked_group_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                    label_smoothing: float = 0.0, row_weight: torch.Tensor | None = None,
                    label_loss: str = "ce") -> torch.Tensor:
    """Softmax loss over one exclusive group; rows with target MISSING add nothing.

    The weighted mean over the rows that have the group, computed with masks rather than boolean
    indexing so that a training step never waits for the GPU. A batch in which nobody has the group
    gives an exact zero that still carries a graph.

    ``row_weight`` (N,): a per-row factor on the loss (weak labels from listing text: their
    ``weak_label_weight``, strong labels 1). It scales each row's term but not the normaliser, which
    stays the (class-weighted) count of rows that have the group: weak labels act as a task of their
    own with a lower weight, even in a batch where every label of the group is weak. None: plain.
    ``label_loss``: one of LABEL_LOSSES (plain cross-entropy by default).
    """
    present = (target != MISSING).float()
    safe = target.clamp(min=0)
    per_row = _row_losses(logits, safe, label_loss, label_smoothing)
    if label_loss == "small_loss":
        present = _small_loss_rows(per_row, present)
    w = present if weight is None else weight[safe] * present
    if row_weight is None:
        return (per_row * w).sum() / w.sum().clamp_min(1e-12)
    return (per_row * w * row_weight.float()).sum() / w.sum().clamp_min(1e-12)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor,
               pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid BCE (with ``pos_weights``) for a non-exclusive group, the mean over the rows that have it."""
    per = F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=pos_weight, reduction="none")
    rows = present.float()[:, None]
    return (per * rows).sum() / (rows.sum() * per.shape[1]).clamp_min(1e-12)


class BatchHardTriplet(nn.Module):
    """Triplet loss: margin 0.3, squared Euclidean distance, batch-hard mining."""

    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        dist = distances.LpDistance(normalize_embeddings=True, p=2, power=2)
        self.miner = miners.BatchHardMiner(distance=dist)
        self.loss = losses.TripletMarginLoss(margin=margin, distance=dist)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keep = labels >= 0
        embeddings, labels = embeddings[keep].float(), labels[keep]
        if embeddings.shape[0] < 2 or labels.unique().numel() < 2:
            return embeddings.sum() * 0.0
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


def conditional_embedding(embedding: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Conditional similarity (a modified conditional similarity network): the L2-normalised masked embedding."""
    return F.normalize(embedding * mask, dim=-1)


@dataclass
class MultitaskLoss:
    """total = λcls·(Lcat + Σ_g w_g·L_g) + λret·(Ltriplet + λcond·Σ_g Lcond_g).

    Calling it returns the total and its parts as detached 0-d tensors: reading them (float) waits for
    the GPU, so the trainer reads them in bulk every few steps, not every step."""

    category_weight: torch.Tensor | None = None  # (C,) class weights for the weighted CE
    group_weight: dict[str, torch.Tensor] = field(default_factory=dict)  # exclusive: class weights
    group_pos_weight: dict[str, torch.Tensor] = field(default_factory=dict)  # non-exclusive: pos_weight
    group_task_weight: dict[str, float] = field(default_factory=dict)  # per-group loss factor (default 1)
    exclusive: dict[str, bool] = field(default_factory=dict)
    weights: LossWeights = field(default_factory=LossWeights)
    margin: float = 0.3
    label_smoothing: float = 0.0  # softmax targets (category, exclusive groups); 0: plain cross-entropy
    category_type: torch.Tensor | None = None  # (C,) type index of each category: the type head's target
    label_loss: str = "ce"  # LABEL_LOSSES: on the category, type and exclusive groups

    def __post_init__(self) -> None:
        if self.label_loss not in LABEL_LOSSES:
            raise ValueError(f"unknown label loss {self.label_loss!r}; choose from {', '.join(LABEL_LOSSES)}")
        self.triplet = BatchHardTriplet(self.margin)

    def to(self, device: torch.device) -> MultitaskLoss:
        if self.category_weight is not None:
            self.category_weight = self.category_weight.to(device)
        if self.category_type is not None:
            self.category_type = self.category_type.to(device)
        self.group_weight = {k: v.to(device) for k, v in self.group_weight.items()}
        self.group_pos_weight = {k: v.to(device) for k, v in self.group_pos_weight.items()}
        return self

    def classification(self, out, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        ls = self.label_smoothing
        cat = masked_group_ce(out.category, batch["category"], self.category_weight, ls,
                              batch.get("weight/category"), self.label_loss)
        parts["cat"] = cat.detach()
        total = cat
        if getattr(out, "type", None) is not None and self.category_type is not None:
            # the type as its own output, its target the labelled category's type
            known = batch["category"] >= 0
            target = torch.where(known, self.category_type[batch["category"].clamp(min=0)], MISSING)
            lt = masked_group_ce(out.type, target, None, ls, batch.get("weight/category"), self.label_loss)
            parts["type"] = lt.detach()
            total = total + lt
        for g, logits in out.groups.items():
            if self.exclusive.get(g, True):
                lg = masked_group_ce(logits, batch[f"group/{g}"], self.group_weight.get(g), ls,
                                     batch.get(f"weight/{g}"), self.label_loss)
            else:
                lg = masked_bce(logits, batch[f"group/{g}"], batch[f"present/{g}"], self.group_pos_weight.get(g))
            parts[f"attr/{g}"] = lg.detach()
            total = total + self.group_task_weight.get(g, 1.0) * lg
        return total, parts

    def retrieval(self, out, batch: dict, masks: torch.Tensor | None, group_names: list[str]
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trip = self.triplet(out.embedding, batch["item_id"])
        parts = {"triplet": trip.detach()}
        total = trip
        if masks is not None and self.weights.condition > 0:
            cond = out.embedding.sum() * 0.0
            for i, g in enumerate(group_names):
                if not self.exclusive.get(g, True):
                    continue  # conditional triplets need one value per sample
                cond = cond + self.triplet(conditional_embedding(out.embedding, masks[i]), batch[f"group/{g}"])
            cond = cond + self.weights.mask_l1 * masks.abs().sum(dim=1).mean() / masks.shape[1]
            parts["condition"] = cond.detach()
            total = total + self.weights.condition * cond
        return total, parts

    def __call__(self, out, batch: dict, *, use_cls: bool, use_ret: bool, masks: torch.Tensor | None = None,
                 group_names: list[str] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = out.embedding.sum() * 0.0
        parts: dict[str, torch.Tensor] = {}
        if use_cls:
            lc, p = self.classification(out, batch)
            total = total + self.weights.cls * lc
            parts.update(p)
        if use_ret:
            lr, p = self.retrieval(out, batch, masks, group_names or [])
            total = total + self.weights.ret * lr
            parts.update(p)
        parts["total"] = total.detach()
        return total, parts
