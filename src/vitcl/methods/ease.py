"""EASE, Expandable Subspace Ensemble (Zhou et al., CVPR 2024): one light adapter per task on a frozen pretrained
ViT, and a prototype classifier over the concatenation of every adapter's feature (docs/methods/ease.md).

Task t: a new AdaptFormer adapter (models/adapters.py) in every block is trained, with a cosine head over the
task's classes only (sigma * cos, sigma learnt from 1), by cross-entropy on the task's data; the backbone and the
older adapters are frozen. After it, the class-token feature of each training image under every adapter s
(s = 0..t; with `use_init_ptm` also the plain pretrained model) gives the new classes a prototype in every
subspace. The old classes have no data in the new subspace t: their prototype there is the prototype complement,
    P[old_i, k] = softmax_j( cos(P[old_i, i], P[new_j, i]) ) @ P[new_j, k]
(old classes of task i, "new" classes those with a real prototype in both subspace i and k: the classes of tasks
k..t; `recalc_sim` recomputes every k in (i, t] at every task, as the reference, otherwise only k = t with the
new task's classes). Inference: for a class c of task i,
    logit_c = sum_s w_is cos(f_s(x), P[c, s]),   w_is = 1 (s = i), alpha / t (other adapters), beta (the PTM)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import create_backbone
from ..models.adapters import AdaptedBlock, add_adapters, blocks_of, set_active_adapter
from .base import Method, MethodOptions, ParamCount, register_method
from .prototypes import per_class_means


@dataclass
class EaseOptions(MethodOptions):
    bottleneck: int = 64  # the adapter's width (the reference's ffn_num)
    adapter_scale: float = 0.1  # ffn_adapter_scalar
    adapter_dropout: float = 0.1
    alpha: float = 0.1  # weight of the other adapters' subspaces at inference (divided by the task index)
    beta: float = 0.0  # weight of the pretrained model's subspace (use_init_ptm)
    use_init_ptm: bool = False  # a subspace of the plain pretrained model beside the adapters'
    recalc_sim: bool = True  # recompute every old complement at each task (the reference's cifar setting)

    def validate(self, key: str) -> None:
        if self.bottleneck < 1:
            raise ConfigError(f"{key}.bottleneck: expected a width >= 1, got {self.bottleneck}")
        if not 0 <= self.adapter_dropout < 1:
            raise ConfigError(f"{key}.adapter_dropout: expected a rate in [0, 1), got {self.adapter_dropout}")
        for name in ("alpha", "beta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: expected a weight >= 0, got {getattr(self, name)}")


class CosineHead(nn.Module):
    """sigma * cos(x, w_c) over one task's classes: the head an adapter is trained with (training only)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        bound = 1 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class EaseModel(nn.Module):
    """The ViT with its adapters, this task's training head and the prototype table (seen, subspaces, d): a
    buffer, so that checkpoints carry it and begin_task rebuilds its shape on resume."""

    prototypes: torch.Tensor

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head: CosineHead | None = None
        self.register_buffer("prototypes", torch.zeros(0, 0, int(cast(int, backbone.num_features))))

    def train(self, mode: bool = True) -> EaseModel:
        """Frozen parts stay in eval mode: only the active adapter (dropout) and the head train."""
        super().train(mode)
        if mode:
            self.backbone.eval()
            for block in blocks_of(self.backbone):
                b = cast(AdaptedBlock, block)
                if isinstance(b, AdaptedBlock) and b.active is not None:
                    b.adapters[b.active].train()
        return self

    def subspace_features(self, x: torch.Tensor, subspaces: list[int | None]) -> torch.Tensor:
        """(B, S, d): the pooled feature under each adapter of `subspaces` (None: the plain model)."""
        vit = cast(Any, self.backbone)
        tokens = vit.embed_tokens(x)  # the same for every adapter: adapters act inside the blocks
        active = cast(AdaptedBlock, blocks_of(vit)[0]).active
        out = []
        try:
            for s in subspaces:
                set_active_adapter(vit, s)
                out.append(vit.forward_head(vit.forward_blocks(tokens)))
        finally:
            set_active_adapter(vit, active)
        return torch.stack(out, dim=1)


def prototype_complement(protos: torch.Tensor, bounds: list[tuple[int, int]], first: int,
                         recalc: bool) -> torch.Tensor:
    """The prototypes (C, S, d) with the old classes' entries in later adapters' subspaces filled in from their
    similarity to the classes that have real prototypes there; `bounds[i]` are task i's classes [lo, hi), the
    last task the current one, `first` the subspace of adapter 0 (1 with the pretrained model's subspace)."""
    out = protos.clone()
    t = len(bounds) - 1
    for i in range(t):
        lo, hi = bounds[i]
        for k in (range(i + 1, t + 1) if recalc else [t]):
            new = slice(bounds[k][0], bounds[t][1])  # classes of tasks k..t: real prototypes in subspaces i and k
            a, b = protos[new, first + i], protos[new, first + k]
            sim = (F.normalize(protos[lo:hi, first + i], dim=1) @ F.normalize(a, dim=1).T).softmax(dim=1)
            out[lo:hi, first + k] = sim @ b
    return out


def subspace_weights(bounds: list[tuple[int, int]], first: int, alpha: float, beta: float) -> torch.Tensor:
    """(C, S): the weight of subspace s in class c's score: 1 for its own task's adapter, alpha / t for the
    other adapters (t the current task's index) and beta for the pretrained model's subspace."""
    t = len(bounds) - 1
    w = torch.full((bounds[-1][1], first + t + 1), alpha / max(t, 1))
    if first:
        w[:, 0] = beta
    for i, (lo, hi) in enumerate(bounds):
        w[lo:hi, first + i] = 1.0
    return w


def ease_scores(feats: torch.Tensor, protos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, C): sum_s weights[c, s] cos(feats[:, s], protos[c, s]), each subspace normalised on its own."""
    cos = torch.einsum("bsd,csd->bcs", F.normalize(feats.float(), dim=2), F.normalize(protos.float(), dim=2))
    return (cos * weights.to(cos.device)).sum(dim=2)


@register_method("ease")
class Ease(Method[EaseOptions]):
    settings = frozenset({"class-il"})
    hard_labels = True  # the adapter's head sees its task's classes only

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.model.name != "vit":
            raise ConfigError(f"model.name: ease puts one adapter per task in a ViT's blocks; expected 'vit', got "
                              f"'{cfg.model.name}'")

    def build_model(self) -> nn.Module:
        backbone = create_backbone(self.cfg.model, self.scenario.train.image_size, self.scenario.train.channels)
        return EaseModel(backbone)

    @property
    def first(self) -> int:
        return 1 if self.opts.use_init_ptm else 0

    def subspaces(self) -> list[int | None]:
        return ([None] if self.opts.use_init_ptm else []) + list(range(self.task_index + 1))

    def bounds(self) -> list[tuple[int, int]]:
        return [(self.scenario[i].offset, self.scenario[i].end) for i in range(self.task_index + 1)]

    def begin_task(self, task):
        super().begin_task(task)
        m, o = cast(EaseModel, self.model), self.opts
        index = add_adapters(m.backbone, o.bottleneck, o.adapter_scale, o.adapter_dropout)
        if index != task.index:
            raise RuntimeError(f"ease: task {task.index} got adapter {index}")
        set_active_adapter(m.backbone, index)
        m.head = CosineHead(int(cast(int, m.backbone.num_features)), task.num_classes).to(self.device)
        old = m.prototypes
        grown = old.new_zeros(task.end, self.first + task.index + 1, old.shape[2])
        grown[: old.shape[0], : old.shape[1]] = old
        m.prototypes = grown

    def setup_phase(self, phase, task):
        m = cast(EaseModel, self.model)
        for p in m.parameters():
            p.requires_grad_(False)
        for block in blocks_of(m.backbone):
            cast(AdaptedBlock, block).adapters[task.index].requires_grad_(True)
        cast(CosineHead, m.head).requires_grad_(True)
        m.train()

    def loss(self, batch, phase, task):
        m = cast(EaseModel, self.model)
        logits = cast(CosineHead, m.head)(m.backbone(batch.x))
        loss = F.cross_entropy(logits, batch.y - task.offset)
        return loss, {}

    # ------------------------------------------------------------------ prototypes
    def embed(self, x):
        """The concatenated features of every subspace (B, S * d)."""
        return cast(EaseModel, self.model).subspace_features(x, self.subspaces()).flatten(1)

    def consolidate(self, task, ctx):
        m = cast(EaseModel, self.model)
        labels = self.scenario.train_labels[task.train_idx]
        feats = ctx.extract(task.train_idx, lambda x: self.embed(x).float())
        classes, means = per_class_means(feats, labels.to(feats.device))
        protos = m.prototypes.clone()
        protos[classes.to(protos.device)] = means.view(len(classes), *protos.shape[1:]).to(protos)
        if task.index > 0:
            protos = prototype_complement(protos, self.bounds(), self.first, self.opts.recalc_sim)
        m.prototypes = protos

    def logits(self, x, task=None):
        m = cast(EaseModel, self.model)
        weights = subspace_weights(self.bounds(), self.first, self.opts.alpha, self.opts.beta)
        return ease_scores(m.subspace_features(x, self.subspaces()), m.prototypes, weights)

    # ------------------------------------------------------------------ accounting
    def count_parameters(self) -> ParamCount:
        """The backbone, every adapter and this task's training head, plus the prototype table's entries (the
        reference's classifier weights; seen x subspaces x d), which nothing trains."""
        c = super().count_parameters()
        return ParamCount(c.total + cast(EaseModel, self.model).prototypes.numel(), c.trainable)
