"""The one multitask model, imported by the worker through model.inference.

backbone → pooled features ─┬─ shared MLP (feat→1024→512, BN, ReLU, Dropout 0.3) ─┬─ category head
                            │                                                    ├─ type head
                            │                                                    └─ one head per attribute group
                            └─ retrieval head (BN, ReLU, Dropout, Linear→256) → L2-normalised embedding
Attribute groups: a softmax per mutually exclusive group, sigmoid outputs otherwise (multi-label groups).
Conditional similarity: one learned non-negative mask per attribute group over the embedding.
Type and category are made consistent at prediction (`joint_category`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones import Backbone, create_backbone
from schemas.taxonomy import Taxonomy


@dataclass
class ModelOutput:
    category: torch.Tensor  # (N, C) logits
    groups: dict[str, torch.Tensor]  # group -> (N, V) logits
    embedding: torch.Tensor  # (N, D) L2-normalised
    type: torch.Tensor | None = None  # (N, T) logits; None: a model without a type head (derived from category)


def _mlp_block(cin: int, cout: int, dropout: float) -> list[nn.Module]:
    return [nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU(inplace=True), nn.Dropout(dropout)]


class MultitaskModel(nn.Module):
    category_type: torch.Tensor  # a buffer, (C,): index of each category's type

    def __init__(self, backbone: Backbone, taxonomy: Taxonomy, embedding_dim: int = 256,
                 hidden: tuple[int, int] = (1024, 512), dropout: float = 0.3, type_head: bool = True) -> None:
        super().__init__()
        self.backbone_name = backbone.name
        self.mean, self.std = backbone.mean, backbone.std
        self._backbone_spec = backbone
        self.frozen_backbone: list[str] = []  # parameter names kept frozen in every training stage
        self.taxonomy = taxonomy
        self.embedding_dim = embedding_dim
        self.group_names = taxonomy.group_names
        self.exclusive = {g.name: g.exclusive for g in taxonomy.attribute_groups}

        self.backbone = backbone.module
        self.shared = nn.Sequential(*_mlp_block(backbone.feat_dim, hidden[0], dropout),
                                    *_mlp_block(hidden[0], hidden[1], dropout))
        self.category_head = nn.Linear(hidden[1], len(taxonomy.categories))
        self.type_head = nn.Linear(hidden[1], len(taxonomy.types)) if type_head else None
        # (C,) index of each category's type: the type target in training, the joint decision in prediction
        self.register_buffer("category_type", torch.tensor(
            [taxonomy.types.index(c.type) for c in taxonomy.categories], dtype=torch.int64), persistent=False)
        self.group_heads = nn.ModuleDict({g.name: nn.Linear(hidden[1], len(g.values))
                                          for g in taxonomy.attribute_groups})
        self.retrieval_head = nn.Sequential(nn.BatchNorm1d(backbone.feat_dim), nn.ReLU(inplace=True),
                                            nn.Dropout(dropout), nn.Linear(backbone.feat_dim, embedding_dim))
        # the condition masks start near 0.9, kept non-negative through softplus
        n_groups = max(1, len(self.group_names))
        init = torch.full((n_groups, embedding_dim), 0.9) + 0.1 * torch.randn(n_groups, embedding_dim)
        self.condition_logits = nn.Parameter(torch.log(torch.expm1(init.clamp_min(0.05))))
        # prediction (not training) averages each photo with its mirror image; saved in the manifest
        self.flip_tta = False
        # weight of the category in the shelf embedding (model/inference.py shelf_embedding); saved in the manifest
        self.shelf_category_weight = 0.0

    # parameter groups the training stages freeze and unfreeze
    def classification_parameters(self) -> list[nn.Parameter]:
        heads = [self.category_head, self.group_heads] + ([self.type_head] if self.type_head is not None else [])
        return [*self.shared.parameters(), *(p for h in heads for p in h.parameters())]

    def retrieval_parameters(self) -> list[nn.Parameter]:
        return [*self.retrieval_head.parameters(), self.condition_logits]

    def freeze_backbone_layers(self, multitask: bool = True) -> list[str]:
        # names as model.named_parameters() gives them, so the stages can keep them frozen
        self.frozen_backbone = [f"backbone.{n}" for n in self._backbone_spec.freeze(multitask)]
        return self.frozen_backbone

    def condition_masks(self) -> torch.Tensor:
        """(G, D) non-negative masks; the conditioned embedding is normalize(e * mask_g)."""
        return F.softplus(self.condition_logits)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        feats = self.backbone(x)
        h = self.shared(feats)
        emb = F.normalize(self.retrieval_head(feats).float(), dim=1)
        return ModelOutput(
            category=self.category_head(h),
            groups={g: head(h) for g, head in self.group_heads.items()},
            embedding=emb,
            type=self.type_head(h) if self.type_head is not None else None,
        )

    def infer(self, x: torch.Tensor) -> ModelOutput:
        """The forward pass for prediction: with ``flip_tta`` the photo and its mirror image go through
        as one batch, their logits are averaged and the embeddings' sum re-normalised."""
        if not self.flip_tta:
            plain: ModelOutput = self(x)
            return plain
        out: ModelOutput = self(torch.cat([x, x.flip(3)]))
        n = len(x)

        def mean(t: torch.Tensor) -> torch.Tensor:
            return (t[:n] + t[n:]) / 2

        return ModelOutput(category=mean(out.category), groups={g: mean(t) for g, t in out.groups.items()},
                           embedding=F.normalize(mean(out.embedding), dim=1),
                           type=None if out.type is None else mean(out.type))


def joint_category(category_probs: torch.Tensor, type_probs: torch.Tensor | None, category_type: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Category and type probabilities that agree (a type head predicts the type beside the category).

    The two heads vote as a product of experts over categories: p(c) ∝ p_cat(c) · p_type(type(c)), and the
    type is the marginal of that, p(t) = Σ_{c of type t} p(c). The argmax category's type is then the
    type the tags say, and a type head sure of "footwear" pulls an unsure category towards the shoes.
    Without a type head: the category probabilities as they are and their type marginal."""
    joint = category_probs if type_probs is None else category_probs * type_probs[:, category_type]
    joint = joint / joint.sum(dim=1, keepdim=True).clamp_min(1e-12)
    types = torch.zeros(joint.shape[0], int(category_type.max()) + 1, dtype=joint.dtype, device=joint.device)
    return joint, types.index_add_(1, category_type, joint)


def build_model(backbone: str, taxonomy: Taxonomy, *, pretrained: bool = True,
                weights_path: str | Path | None = None, embedding_dim: int = 256,
                type_head: bool = True) -> MultitaskModel:
    """The model for a taxonomy: head sizes come from the taxonomy file, the trunk from the registry."""
    return MultitaskModel(create_backbone(backbone, pretrained=pretrained, weights_path=weights_path),
                          taxonomy, embedding_dim=embedding_dim, type_head=type_head)
