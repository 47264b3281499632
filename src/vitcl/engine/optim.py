"""Optimisers (timm's weight-decay rule: none on biases and 1-D parameters) and per-epoch lr schedules."""
from __future__ import annotations

import math

import torch

from ..methods.base import Phase


def build_optimizer(params: list[tuple[str, torch.nn.Parameter]], phase: Phase) -> torch.optim.Optimizer:
    decay = [p for n, p in params if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in params if not (p.ndim > 1 and not n.endswith(".bias"))]
    groups = [{"params": decay, "weight_decay": phase.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if phase.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=phase.lr, momentum=phase.momentum, nesterov=phase.nesterov)
    if phase.optimizer == "adam":
        return torch.optim.Adam(groups, lr=phase.lr)
    if phase.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=phase.lr, eps=1e-8)
    raise ValueError(f"unknown optimizer {phase.optimizer!r}")


def lr_at(phase: Phase, epoch: int) -> float:
    """The learning rate of a 0-based epoch (timm's per-epoch stepping: warmup linear, then the schedule)."""
    if epoch < phase.warmup_epochs:
        return phase.warmup_lr + (phase.lr - phase.warmup_lr) * epoch / phase.warmup_epochs
    if phase.schedule == "constant":
        return phase.lr
    if phase.schedule == "multistep":
        return phase.lr * phase.gamma ** sum(epoch >= m for m in phase.milestones)
    if phase.schedule == "cosine":
        t = epoch - phase.warmup_epochs
        span = max(phase.epochs - phase.warmup_epochs, 1)
        return phase.min_lr + 0.5 * (phase.lr - phase.min_lr) * (1 + math.cos(math.pi * t / span))
    raise ValueError(f"unknown schedule {phase.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
