"""BiC, bias correction (Wu et al., CVPR 2019): distillation weighted by the share of old classes, then a
two-parameter linear correction of the newest task's logits trained on a held-out split that is balanced over
old and new classes. Equations, defaults and sources: docs/methods/bic.md.

Per task t >= 1 (task 0 trains on all its data with CE and has no correction):
- hold out, per seen class, k = floor(val_ratio * m_old) rows (m_old: the memory's per-class budget over the old
  classes): of the new classes' data and of each old class's exemplars, seeded; stage 1 never sees them.
- stage 1 ("train"), on the rest: (1 - lam) * CE(q, y) + lam * KD_T(q[:, :n_old], teacher), lam = n_old / n_seen,
  KD_T = -mean_i sum_c softmax(teacher/T) log softmax(q/T); q are the corrected logits (the earlier tasks'
  corrections stay applied, frozen; the new task's is the identity while stage 1 runs).
- stage 2 ("bias"), on the held-out rows, only alpha_t, beta_t train: q_c = alpha_t * o_c + beta_t for the new
  classes c, the old logits unchanged; loss CE(q, y).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..data.stream_memory import StreamMemory
from ..data.transfer import device_tensor
from ..errors import ConfigError
from ..models.heads import TaskHead
from .base import register_method
from .distilled import Distilled, DistilledOptions
from .finetune import Classifier
from .losses import classification_loss, soft_distillation


# --------------------------------------------------------------------------------------------- the post-hoc step
class BiasLayer(nn.Module):
    """One task's (alpha, beta), the identity when built."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))


def bias_correction(logits: torch.Tensor, bounds: list[int], alphas: torch.Tensor,
                    betas: torch.Tensor) -> torch.Tensor:
    """Task g's logits (columns [bounds[g], bounds[g + 1])) mapped to alphas[g] * o + betas[g]."""
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    repeats = device_tensor(sizes, logits.device)
    scale = torch.repeat_interleave(alphas.to(logits.dtype), repeats, output_size=bounds[-1] - bounds[0])
    shift = torch.repeat_interleave(betas.to(logits.dtype), repeats, output_size=bounds[-1] - bounds[0])
    return logits * scale + shift


class BiCClassifier(Classifier):
    """Backbone, growing head, and one bias layer per task applied to that task's logits."""

    def __init__(self, backbone, head):
        super().__init__(backbone, head)
        self.bias_layers = nn.ModuleList()

    def bounds(self) -> list[int]:
        out = [0]
        for h in self.head.heads:
            out.append(out[-1] + cast(TaskHead, h).fc.out_features)
        return out

    def correct(self, logits: torch.Tensor) -> torch.Tensor:
        layers = [cast(BiasLayer, b) for b in self.bias_layers]
        alphas = torch.cat([b.alpha for b in layers])
        betas = torch.cat([b.beta for b in layers])
        return bias_correction(logits, self.bounds(), alphas, betas)

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        feats = self.backbone(x)
        if task is not None:
            b = cast(BiasLayer, self.bias_layers[task])
            return self.head(feats, task) * b.alpha + b.beta
        return self.correct(self.head(feats))


# --------------------------------------------------------------------------------------------- the held-out split
def holdout_split(rows: torch.Tensor, labels: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out): per class in label order, a seeded random min(k, n_c) of its rows held out."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = rows.cpu(), labels.cpu()
    held = []
    for c in labels.unique(sorted=True).tolist():
        mine = rows[labels == c]
        held.append(mine[torch.randperm(len(mine), generator=g)[: min(k, len(mine))]])
    out = torch.cat(held) if held else rows[:0]
    return rows[~torch.isin(rows, out)], out


def split_seed(seed: int, task: int) -> int:
    return int(hashlib.sha256(repr((seed, task, "bic-holdout")).encode()).hexdigest()[:15], 16)


# --------------------------------------------------------------------------------------------- the method
@dataclass
class BiCOptions(DistilledOptions):
    val_ratio: float = 0.1  # share of each old class's exemplars held out (train : val = 9 : 1 in the paper)
    bias_epochs: int | None = None  # stage 2's epochs; None: train.epochs (PyCIL)
    bias_lr: float | None = None  # stage 2's lr (scaled like train.lr); None: train.lr (PyCIL)
    bias_loss: Literal["ce", "softmax_ce"] = "ce"  # softmax_ce: PyCIL's cross-entropy of the softmax outputs
    bias_bn: Literal["eval", "train"] = "eval"  # train: BatchNorm statistics move in stage 2, as in PyCIL
    # true: every task's correction stays applied (PyCIL); false: only the newest task's, earlier ones reset to the
    # identity when a task begins (DER's code: one post-processor, reset each task)
    keep_corrections: bool = True

    def validate(self, key: str) -> None:
        super().validate(key)
        if not 0 <= self.val_ratio < 1:
            raise ConfigError(f"{key}.val_ratio: expected a share in [0, 1), got {self.val_ratio}")
        if self.bias_epochs is not None and self.bias_epochs < 0:
            raise ConfigError(f"{key}.bias_epochs: expected >= 0 or null, got {self.bias_epochs}")
        if self.bias_lr is not None and self.bias_lr < 0:
            raise ConfigError(f"{key}.bias_lr: expected >= 0 or null, got {self.bias_lr}")


@register_method("bic")
class BiC(Distilled):
    opts: BiCOptions
    Options = BiCOptions
    model: BiCClassifier

    def build_model(self) -> nn.Module:
        plain = super().build_model()
        return BiCClassifier(plain.backbone, plain.head)

    def begin_task(self, task):
        super().begin_task(task)  # the teacher keeps the corrections it was evaluated with
        if not self.opts.keep_corrections:
            with torch.no_grad():
                for b in self.model.bias_layers:
                    cast(BiasLayer, b).alpha.fill_(1.0)
                    cast(BiasLayer, b).beta.zero_()
        self.model.bias_layers.append(BiasLayer().to(self.device))

    def holdout_per_class(self, task) -> int:
        if task.index == 0:
            return 0
        assert not isinstance(self.memory, StreamMemory)  # BiC's memory is filled at task ends
        return int(self.opts.val_ratio * self.memory.budget.per_class(task.offset))

    def phases(self, task):
        phases = [self.train_phase(task)]
        o, t = self.opts, self.cfg.train
        if self.holdout_per_class(task) > 0:
            epochs = t.epochs if o.bias_epochs is None else o.bias_epochs
            lr = t.scaled_lr(t.lr if o.bias_lr is None else o.bias_lr)
            if epochs > 0:
                phases.append(self.train_phase(task, "bias", epochs=epochs, lr=lr))
        return phases

    def phase_rows(self, phase, task, rows):
        k = self.holdout_per_class(task)
        if k == 0:
            return rows
        kept, held = holdout_split(rows, self.scenario.train_labels[rows], k, split_seed(self.cfg.run.seed, task.index))
        return held if phase.name == "bias" else kept

    def setup_phase(self, phase, task):
        m = self.model
        if phase.name == "bias":
            m.requires_grad_(False)
            m.bias_layers[-1].requires_grad_(True)
            m.train(self.opts.bias_bn == "train")
            return
        m.requires_grad_(True)
        m.bias_layers.requires_grad_(False)
        m.train()

    def loss(self, batch, phase, task):
        m = self.model
        if phase.name == "bias":
            with torch.no_grad():
                feats = m.backbone(batch.x)
            q = m.correct(m.head(feats))
            if self.opts.bias_loss == "softmax_ce":
                q = q.softmax(dim=1)
            loss = F.cross_entropy(q, batch.y)
            return loss, {"bias": loss.detach()}
        logits = m(batch.x)
        ce = classification_loss(logits, batch)
        if self.teacher is None:
            return ce, {"cls": ce.detach()}
        n_old = task.offset
        with torch.no_grad():
            old = self.teacher(batch.x)
        kd = soft_distillation(logits[:, :n_old], old, self.opts.temperature)
        lam = n_old / logits.shape[1]
        return (1 - lam) * ce + lam * kd, {"cls": ce.detach(), "kd": kd.detach()}
