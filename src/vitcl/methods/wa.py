"""WA, weight aligning (Zhao et al., CVPR 2020): distillation on the old classes, then after each task the new
classes' weight vectors rescaled to the old classes' mean norm; the classifier's weights kept non-negative.
Equations, defaults and sources: docs/methods/wa.md.

Per task t >= 1, on the task's data + the memory:
    loss = (1 - lam) * CE(logits, y) + lam * KD_T(logits[:, :n_old], teacher),    lam = n_old / n_seen
(`kd_weight: w`: CE + w * KD_T, PyCIL's form with w = 2), KD_T = -mean_i sum_c softmax(z_old/T) log softmax(z/T).
After the task: gamma = mean_{c old} ||W_c|| / mean_{c new} ||W_c||, W_new <- gamma * W_new (biases untouched).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..errors import ConfigError
from ..models.heads import GrowingHead, TaskHead
from .base import register_method
from .distilled import Distilled, DistilledOptions
from .losses import classification_loss, soft_distillation


def align_factor(weights: torch.Tensor, n_old: int) -> torch.Tensor:
    """gamma = mean L2 norm of the old classes' weight rows / that of the new classes' rows."""
    norms = weights.float().norm(dim=1)
    return norms[:n_old].mean() / norms[n_old:].mean()


def task_linears(head: GrowingHead) -> list[nn.Linear]:
    return [cast(TaskHead, h).fc for h in head.heads]


def head_weights(head: GrowingHead) -> torch.Tensor:
    """The weight rows of all seen classes, in label order (one linear over all classes)."""
    return torch.cat([fc.weight for fc in task_linears(head)])


@torch.no_grad()
def weight_align(head: GrowingHead) -> float:
    """Rescale the newest task's weight rows by `align_factor` over all rows; returns gamma."""
    new = task_linears(head)[-1]
    n_old = head.num_classes - new.out_features
    gamma = align_factor(head_weights(head), n_old)
    new.weight.mul_(gamma.to(new.weight.dtype))
    return float(gamma)


@torch.no_grad()
def clip_weights(head: GrowingHead) -> None:
    """The WA paper's weight clipping: every classifier weight clamped at 0 from below (biases untouched)."""
    for fc in task_linears(head):
        fc.weight.clamp_(min=0)


@dataclass
class WAOptions(DistilledOptions):
    kd_weight: float | None = None  # None: the paper's (1 - lam) CE + lam KD, lam = n_old / n_seen; w: CE + w KD
    clip: bool = True  # the paper's non-negative classifier weights (PyCIL's wa.py has no clipping)
    align: bool = True  # weight aligning after each task t >= 1
    head_bias: bool = True  # false: the classifier's biases fixed at 0 (DER's WA code: `use_bias: False`)

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.kd_weight is not None and self.kd_weight < 0:
            raise ConfigError(f"{key}.kd_weight: expected a value >= 0 or null, got {self.kd_weight}")


@register_method("wa")
class WA(Distilled):
    opts: WAOptions
    Options = WAOptions

    def begin_task(self, task):
        super().begin_task(task)
        if not self.opts.head_bias:
            with torch.no_grad():
                task_linears(self.model.head)[-1].bias.zero_()

    def setup_phase(self, phase, task):
        super().setup_phase(phase, task)
        if not self.opts.head_bias:
            for fc in task_linears(self.model.head):
                fc.bias.requires_grad_(False)

    def loss(self, batch, phase, task):
        if self.opts.clip:  # before every forward pass: the same as after every optimiser step
            clip_weights(self.model.head)
        logits = self.model(batch.x)
        ce = classification_loss(logits, batch)
        if self.teacher is None:
            return ce, {"cls": ce.detach()}
        n_old = task.offset
        with torch.no_grad():
            old = self.teacher(batch.x)
        kd = soft_distillation(logits[:, :n_old], old, self.opts.temperature)
        w = self.opts.kd_weight
        lam = n_old / logits.shape[1]
        loss = (1 - lam) * ce + lam * kd if w is None else ce + w * kd
        return loss, {"cls": ce.detach(), "kd": kd.detach()}

    def consolidate(self, task, ctx):
        if self.opts.clip:  # the last optimiser step's clipping
            clip_weights(self.model.head)
        if task.index > 0 and self.opts.align:
            self.gamma = weight_align(self.model.head)
