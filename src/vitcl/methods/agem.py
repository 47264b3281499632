"""A-GEM (Chaudhry et al., ICLR 2019): averaged GEM (docs/methods/agem.md).

Each step trains on the task's batch only; with g the step's gradient and g_ref the gradient of the
cross-entropy on one memory batch (drawn every step, augmented like training data: Mammoth's models/agem.py), a
step with <g, g_ref> < 0 uses g - (<g, g_ref> / <g_ref, g_ref>) g_ref instead: the projection onto the half-space
of the averaged memory constraint.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..data import distributed
from ..errors import ConfigError
from .base import MethodOptions, register_method
from .gem import EpisodicMemory, flat_grad, loss_gradient, write_grad


@dataclass
class AGEMOptions(MethodOptions):
    memory_batch: int = 0  # rows of the reference batch; 0: train.batch_size (Mammoth's minibatch_size)

    def validate(self, key: str) -> None:
        if self.memory_batch < 0:
            raise ConfigError(f"{key}.memory_batch: expected 0 (train.batch_size) or more, got {self.memory_batch}")


def agem_project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """g, or its projection onto {v : <v, g_ref> >= 0} when it points against g_ref (a masked step: no host read)."""
    dot = g @ g_ref
    return g - dot.clamp(max=0) / (g_ref @ g_ref) * g_ref


@register_method("agem")
class AGEM(EpisodicMemory):
    Options = AGEMOptions
    opts: AGEMOptions

    def phases(self, task):
        size = self.opts.memory_batch or self.cfg.train.batch_size
        return [replace(p, data="task", memory_batch=size) for p in super().phases(task)]

    def before_step(self, batches, phase, task):
        memory = [b.memory for b in batches if b.memory is not None]
        if not memory:
            return
        params = self.trainable()
        x, y = torch.cat([m.x for m in memory]), torch.cat([m.y for m in memory])
        # the reference gradient of the whole memory batch: each rank's share, weighted by its rows
        rows = torch.full((), float(len(y)), device=self.device)  # a fill: no copy from the host
        g_ref = loss_gradient(self.model, params, x, y) * rows
        g_ref = distributed.all_reduce_sum(g_ref) / distributed.all_reduce_sum(rows)
        write_grad(params, agem_project(flat_grad(params), g_ref))
