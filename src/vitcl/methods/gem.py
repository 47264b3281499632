"""GEM (Lopez-Paz & Ranzato, NeurIPS 2017): gradient episodic memory (docs/methods/gem.md).

Each step trains on the task's batch only. With g the step's gradient (all trainable parameters, flattened) and
g_k the gradient of the cross-entropy on past task k's exemplars (un-augmented, the model in its current mode), a
step that violates <g, g_k> >= 0 for some k is replaced by the closest gradient that satisfies all of them, from the
dual QP as Mammoth's models/gem.py solves it (`project_to_cone`):
    min_v 1/2 v^T (G G^T + eps I) v + (G g)^T v   s.t.  v >= margin,      g~ = G^T v + g
(G: the rows g_k; margin 0 gives the paper's projection, Mammoth's default 0.5 pushes past the boundary).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..data.transfer import to_device
from ..errors import ConfigError
from .base import MethodOptions, register_method
from .finetune import Finetune


@dataclass
class GEMOptions(MethodOptions):
    margin: float = 0.5  # Mammoth's --gamma
    eps: float = 1e-3  # ridge on the dual's Gram matrix (Mammoth's eps)

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
        self.images = torch.empty(0)  # the memory's un-augmented images, row-aligned with memory.indices()

    def phases(self, task):
        return [replace(p, data="task") for p in super().phases(task)]

    def update_memory(self, task, ctx):
        super().update_memory(task, ctx)
        rows = self.memory.indices()
        self.images = ctx.extract(rows, lambda x: x).cpu() if len(rows) else torch.empty(0)

    def before_step(self, batches, phase, task):
        rows = self.memory.indices()
        if not len(rows):
            return
        params = self.trainable()
        labels = self.scenario.train_labels[rows]
        past = torch.as_tensor([self.task_of(int(c)) for c in labels.tolist()])
        memories = []
        for k in past.unique(sorted=True).tolist():
            pick = past == k
            x, y = to_device(self.images[pick], self.device), to_device(labels[pick], self.device)
            memories.append(loss_gradient(self.model, params, x, y))
        g = flat_grad(params)
        grads = torch.stack(memories)
        if bool((grads @ g < 0).any()):
            write_grad(params, project_to_cone(g, grads, self.opts.margin, self.opts.eps))

    def task_of(self, label: int) -> int:
        return next(t.index for t in self.scenario if label in t.labels)

    def extra_state(self) -> dict:
        return {"images": self.images}

    def load_extra_state(self, state: dict) -> None:
        self.images = state.get("images", torch.empty(0))
