"""GEM (Lopez-Paz & Ranzato, NeurIPS 2017): gradient episodic memory (docs/methods/gem.md).

Each step trains on the task's batch only. With g the step's gradient (all trainable parameters, flattened) and
g_k the gradient of the cross-entropy on past task k's exemplars (the whole memory at every step, augmented like
the task's batch as Mammoth draws it, or un-augmented with `memory_images: plain`; the model in its current mode), a
step that violates <g, g_k> >= 0 for some k is replaced by the closest gradient that satisfies all of them, from the
dual QP as Mammoth's models/gem.py solves it (`project_to_cone`):
    min_v 1/2 v^T (G G^T + eps I) v + (G g)^T v   s.t.  v >= margin,      g~ = G^T v + g
(G: the rows g_k; margin 0 gives the paper's projection, Mammoth's default 0.5 pushes past the boundary).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..data import distributed
from ..data.transfer import to_device
from ..errors import ConfigError
from .base import MethodOptions, register_method
from .finetune import Finetune


@dataclass
class GEMOptions(MethodOptions):
    margin: float = 0.5  # Mammoth's --gamma
    eps: float = 1e-3  # ridge on the dual's Gram matrix (Mammoth's eps)
    # the exemplars the constraints are computed on: drawn with the training augmentation at every step (Mammoth's
    # buffer.get_data(..., transform)), or the un-augmented images kept at the task's end
    memory_images: Literal["augmented", "plain"] = "augmented"

    def validate(self, key: str) -> None:
        if self.margin < 0:
            raise ConfigError(f"{key}.margin: expected a margin >= 0, got {self.margin}")
        if self.eps < 0:
            raise ConfigError(f"{key}.eps: expected eps >= 0, got {self.eps}")


def solve_qp():
    """quadprog's solver, or a ConfigError naming the extra that installs it."""
    try:
        import quadprog
    except ImportError as e:
        raise ConfigError("method.name: gem needs the quadprog package; pip install 'vitcl[gem]'") from e
    return quadprog.solve_qp


def project_to_cone(g: torch.Tensor, memories: torch.Tensor, margin: float = 0.5, eps: float = 1e-3) -> torch.Tensor:
    """The gradient GEM steps with: g (P,) moved by the dual QP's solution onto the cone of the rows of
    `memories` (K, P), in float64."""
    rows = memories.detach().double().cpu().numpy()
    grad = g.detach().double().cpu().numpy()
    gram = rows @ rows.T
    gram = 0.5 * (gram + gram.T) + eps * np.eye(len(rows))
    # quadprog: min 1/2 v^T Q v - a^T v  s.t.  C^T v >= b
    v = solve_qp()(gram, -(rows @ grad), np.eye(len(rows)), np.full(len(rows), margin))[0]
    return torch.from_numpy(v @ rows + grad).to(g.device, g.dtype)


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    """The parameters' gradients as one vector (zeros where a parameter has none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def write_grad(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    start = 0
    for p in params:
        n = p.numel()
        p.grad = flat[start:start + n].view_as(p).to(p.dtype).clone()
        start += n


def loss_gradient(model, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The flattened gradient of the mean cross-entropy of `model` on (x, y), leaving .grad untouched."""
    with torch.enable_grad():
        loss = F.cross_entropy(model(x).float(), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


class EpisodicMemory(Finetune):
    """The task-end memory, trained on apart from the task's data (GEM, A-GEM): memory.size > 0, one bank."""

    uses_memory = True
    settings = frozenset({"class-il", "task-il"})

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if not (cfg.memory.size or cfg.memory.per_class):
            raise ConfigError(f"memory.size: {cfg.method.name} constrains its steps with a memory; give one "
                              "(200 or 500 in LVT's tables)")
        if cfg.memory.ranks != 1:
            raise ConfigError(f"memory.ranks: {cfg.method.name} uses one memory bank; expected 1, "
                              f"got {cfg.memory.ranks}")

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]


@register_method("gem")
class GEM(EpisodicMemory):
    Options = GEMOptions
    opts: GEMOptions

    def __init__(self, cfg, scenario, device):
        solve_qp()  # fail at build time, not at the second task
        super().__init__(cfg, scenario, device)
        self.images = torch.empty(0)  # memory_images plain: the un-augmented images, row-aligned with indices()

    def phases(self, task):
        # augmented: the engine's memory batch is the whole memory, drawn afresh (crops, flips) every step
        size = self.cfg.memory.size + self.cfg.memory.per_class * self.scenario.num_classes
        size = size if self.opts.memory_images == "augmented" else 0
        return [replace(p, data="task", memory_batch=size) for p in super().phases(task)]

    def update_memory(self, task, ctx):
        super().update_memory(task, ctx)
        rows = self.memory.indices()
        keep = len(rows) and self.opts.memory_images == "plain"
        self.images = ctx.extract(rows, lambda x: x).cpu() if keep else torch.empty(0)

    def memory_images(self, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images on the device, labels on the device, train-set rows on the host) of the memory this step."""
        if self.opts.memory_images == "plain":
            rows = self.memory.indices()
            return (to_device(self.images, self.device), to_device(self.scenario.train_labels[rows], self.device),
                    rows)
        memory = [b.memory for b in batches if b.memory is not None]
        if not memory:
            return torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long)
        return (torch.cat([m.x for m in memory]), torch.cat([m.y for m in memory]),
                torch.cat([m.index for m in memory]))

    def before_step(self, batches, phase, task):
        if not len(self.memory) or not task.index:
            return
        x, y, rows = self.memory_images(batches)
        params = self.trainable()
        past = self.scenario.task_of_label[self.scenario.train_labels[rows]]  # on the host
        memories = []
        for k in range(task.index):  # every rank computes every past task's gradient (its share of the rows)
            pick = (past == k).nonzero().flatten()
            n = torch.full((), float(len(pick)), device=self.device)  # a fill: no copy from the host
            gk = (loss_gradient(self.model, params, x[to_device(pick, x.device)], y[to_device(pick, y.device)]) * n
                  if len(pick) else torch.zeros(sum(p.numel() for p in params), device=self.device))
            if self.opts.memory_images == "augmented":  # the ranks' shares of the drawn memory, weighted by rows
                gk, n = distributed.all_reduce_sum(gk), distributed.all_reduce_sum(n)
            memories.append(gk / n)
        g = flat_grad(params)
        grads = torch.stack(memories)
        if bool((grads @ g < 0).any()):
            write_grad(params, project_to_cone(g, grads, self.opts.margin, self.opts.eps))

    def extra_state(self) -> dict:
        return {"images": self.images}

    def load_extra_state(self, state: dict) -> None:
        self.images = state.get("images", torch.empty(0))
