"""EWC (Kirkpatrick et al., PNAS 2017), class-incremental with a growing head and no memory; online EWC
(Schwarz et al., ICML 2018) as an option (docs/methods/ewc.md).

Loss of a batch, once a task has been consolidated:
    CE(logits over the task's own classes, y - offset)  +  lamb * 1/2 sum_i F_i (theta_i - theta*_i)^2
After each task (`consolidate`): theta* <- the parameters now, and the diagonal Fisher of the task's training
data, estimated as FACIL does: per batch b of the task's rows, the gradient g_b of the mean cross-entropy
towards the model's own prediction (fisher_targets: prediction; `label` uses the labels, `sample` draws the
class from the model's softmax), F_t = sum_b |b| g_b^2 / N. It merges with the running one as
    merge 'average' (FACIL): F <- alpha F + (1 - alpha) F_t   (alpha 0.5; F starts at 0)
    merge 'online'  (online EWC): F <- gamma F + F_t
with one anchor theta* either way. The penalty covers the backbone (FACIL); `penalise_heads` adds the heads.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import MethodOptions, register_method
from .finetune import Finetune
from .losses import ewc_penalty, task_cross_entropy

FisherTargets = Literal["prediction", "label", "sample"]


@dataclass
class EWCOptions(MethodOptions):
    lamb: float = 5000.0  # FACIL's default (PyCIL's ewc.py: 1000 on a Fisher without the |b| factor)
    fisher_targets: FisherTargets = "prediction"  # FACIL's max_pred; label: PyCIL's; sample: the true Fisher
    fisher_batch_size: int = 0  # 0: train.batch_size (FACIL's training loader); 1: the per-sample Fisher
    merge: Literal["average", "online"] = "average"
    alpha: float = 0.5  # average: the old Fisher's share (FACIL)
    gamma: float = 1.0  # online: the old Fisher's decay
    penalise_heads: bool = False
    ce_scope: Literal["task", "all"] = "task"  # task: CE over the new classes only (FACIL, PyCIL)
    freeze_old_heads: bool = True  # FACIL's optimiser without exemplars

    def validate(self, key: str) -> None:
        if self.lamb < 0:
            raise ConfigError(f"{key}.lamb: expected a weight >= 0, got {self.lamb}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"{key}.alpha: expected a share in [0, 1], got {self.alpha}")
        if self.gamma < 0:
            raise ConfigError(f"{key}.gamma: expected a decay >= 0, got {self.gamma}")
        if self.fisher_batch_size < 0:
            raise ConfigError(f"{key}.fisher_batch_size: expected 0 (train.batch_size) or more, "
                              f"got {self.fisher_batch_size}")


def diagonal_fisher(logits_fn: Callable[[torch.Tensor], torch.Tensor], params: dict[str, nn.Parameter],
                    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], targets: FisherTargets = "prediction",
                    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """sum_b |b| g_b^2 / N over the (images, labels) batches, g_b the gradient of the batch's mean cross-entropy
    towards `targets` (the argmax, the labels, or one class drawn from the softmax per row)."""
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    rows = torch.zeros((), dtype=torch.float64)
    names, tensors = list(params), list(params.values())
    for x, y in batches:
        with torch.enable_grad():
            logits = logits_fn(x).float()
            if targets == "label":
                t = y.to(logits.device)
            elif targets == "prediction":
                t = logits.detach().argmax(1)
            else:
                t = torch.multinomial(logits.detach().softmax(1), 1).squeeze(1)
            grads = torch.autograd.grad(F.cross_entropy(logits, t), tensors, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                sums[n] += g.float() ** 2 * len(x)
        rows += len(x)
    if reduce_sum is not None:
        for s in sums.values():
            reduce_sum(s)
        rows = reduce_sum(rows.to(next(iter(sums.values())).device)).cpu() if sums else rows
    return {n: s / max(float(rows), 1.0) for n, s in sums.items()}


@register_method("ewc")
class EWC(Finetune):
    Options = EWCOptions
    opts: EWCOptions
    settings = frozenset({"class-il"})

    def __init__(self, cfg, scenario, device):
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        super().__init__(cfg, scenario, device)

    def penalised(self) -> dict[str, nn.Parameter]:
        """The parameters the penalty covers, by name: the backbone's (and the heads' with penalise_heads)."""
        prefix = "" if self.opts.penalise_heads else "backbone."
        return {n: p for n, p in self.model.named_parameters() if n.startswith(prefix)}

    def setup_phase(self, phase, task):
        super().setup_phase(phase, task)
        if self.opts.freeze_old_heads:
            for head in list(self.model.head.heads)[:-1]:
                head.requires_grad_(False)

    def loss(self, batch, phase, task):
        logits = self.model(batch.x)
        ce = task_cross_entropy(logits, batch, task.offset, self.opts.ce_scope)
        if not self.fisher:
            return ce, {"ce": ce.detach()}
        params = dict(self.model.named_parameters())
        penalty = ewc_penalty(params, self.fisher, self.anchor)
        return ce + self.opts.lamb * penalty, {"ce": ce.detach(), "ewc": penalty.detach()}

    def consolidate(self, task, ctx):
        o = self.opts
        params = self.penalised()
        batch = o.fisher_batch_size or self.cfg.train.batch_size
        labels = self.scenario.train_labels
        # FACIL's pass: training transforms and training mode; the BatchNorm statistics it would move are restored
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        was_training = self.model.training
        self.model.train()
        batches = ((x, labels[rows]) for x, rows in ctx.batches(task.train_idx, augment=True, batch_size=batch))
        current = diagonal_fisher(self.model, params, batches, o.fisher_targets, ctx.reduce_sum)
        self.model.train(was_training)
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                b.copy_(buffers[n])
        for n, f in current.items():
            old = self.fisher.get(n, torch.zeros_like(f))  # a head added since has no old Fisher
            self.fisher[n] = (o.alpha * old + (1 - o.alpha) * f) if o.merge == "average" else o.gamma * old + f
        self.anchor = {n: p.detach().clone().float() for n, p in params.items()}

    def extra_state(self) -> dict:
        return {"fisher": {n: f.cpu() for n, f in self.fisher.items()},
                "anchor": {n: a.cpu() for n, a in self.anchor.items()}}

    def load_extra_state(self, state: dict) -> None:
        self.fisher = {n: f.to(self.device) for n, f in state.get("fisher", {}).items()}
        self.anchor = {n: a.to(self.device) for n, a in state.get("anchor", {}).items()}
