"""Optimisers (timm's weight-decay rule: none on biases and 1-D parameters) and per-epoch lr schedules."""
from __future__ import annotations

import math

import torch

from ..config import OptimConfig


def build_optimizer(params: list[tuple[str, torch.nn.Parameter]], optim: OptimConfig,
                    lr_scales: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """`lr_scales`: {parameter-name prefix: factor} for parameters trained at a multiple of the phase's lr (SLCA's
    slow backbone); the longest matching prefix wins; `set_lr` keeps the factor."""
    groups: list[dict] = []
    for scale, named in group_by_scale(params, lr_scales or {}).items():
        decay = [p for n, p in named if p.ndim > 1 and not n.endswith(".bias")]
        no_decay = [p for n, p in named if not (p.ndim > 1 and not n.endswith(".bias"))]
        groups += [{"params": decay, "weight_decay": optim.weight_decay, "lr_scale": scale},
                   {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = optim.lr * g["lr_scale"]
    fused = use_fused([p for _, p in params])
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                               fused=fused, foreach=not fused)
    if optim.optimizer == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, fused=fused, foreach=not fused)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, eps=1e-8, fused=fused, foreach=not fused)
    raise ValueError(f"unknown optimizer {optim.optimizer!r}")


def group_by_scale(params: list[tuple[str, torch.nn.Parameter]],
                   lr_scales: dict[str, float]) -> dict[float, list[tuple[str, torch.nn.Parameter]]]:
    out: dict[float, list[tuple[str, torch.nn.Parameter]]] = {}
    for n, p in params:
        match = max((k for k in lr_scales if n == k or n.startswith(k.rstrip(".") + ".")), key=len, default=None)
        out.setdefault(1.0 if match is None else float(lr_scales[match]), []).append((n, p))
    return out


def use_fused(params: list[torch.nn.Parameter]) -> bool:
    """The optimiser's update kernel, set explicitly because torch's defaults differ by version: one fused kernel
    when every parameter is a floating CUDA tensor, else the multi-tensor (foreach) loop; the update is the same."""
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def lr_at(optim: OptimConfig, epochs: int, epoch: int) -> float:
    """The learning rate of a 0-based epoch of `epochs` (timm's per-epoch stepping: warmup linear, then the
    schedule); `lr_step: timm-after-epoch` shifts it one epoch later."""
    if optim.lr_step == "timm-after-epoch":
        epoch = max(epoch - 1, 0)
    if epoch < optim.warmup_epochs:
        return optim.warmup_lr + (optim.lr - optim.warmup_lr) * epoch / optim.warmup_epochs
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "multistep":
        return optim.lr * optim.gamma ** sum(epoch >= m for m in optim.milestones)
    if optim.schedule == "cosine":
        t = epoch - optim.warmup_epochs
        span = max(epochs - optim.warmup_epochs, 1)
        return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * t / span))
    raise ValueError(f"unknown schedule {optim.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
