"""RanPAC (McDonnell et al., NeurIPS 2023): random projections and a closed-form ridge classifier on a pretrained
ViT, adapted in the first session only (docs/methods/ranpac.md).

Task 0 (`first_session: adapter`): an AdaptFormer adapter in every block is trained with a cosine head over the
task's classes (sigma * cos, sigma learnt from 1), by cross-entropy; the backbone is frozen, and after the task
the adapter and head are frozen too. Every task then, with f the backbone's class-token feature of a training
image (test transform) and W (d x M) a fixed Gaussian N(0, 1) projection drawn once from run.seed:
    h = relu(f W),   G += sum h h^T  (M x M),   C += sum h y^T  (M x classes, y one-hot)
    W_o = (G + lambda I)^-1 C,   scores(x) = h(x) W_o   (the raw product; the reference's sigma is 1 here)
lambda is the grid value 10^-8 .. 10^8 whose ridge fit on the first 80% of the task's (shuffled) rows has the
lowest mean squared error on the other 20% (the reference's optimise_ridge_parameter).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import create_backbone
from ..models.adapters import AdaptedBlock, add_adapters, blocks_of, set_active_adapter
from .base import Method, MethodOptions, ParamCount, register_method
from .ease import CosineHead

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def seed_of(*parts) -> int:
    """A seed derived from run.seed and a purpose, the same on every process and platform."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


@dataclass
class RanPACOptions(MethodOptions):
    first_session: Literal["adapter", "none"] = "adapter"  # none: the frozen pretrained model throughout
    bottleneck: int = 64  # the first-session adapter's width (ffn_num)
    adapter_scale: float = 0.1
    adapter_dropout: float = 0.1
    projection_dim: int = 10000  # M; 0: no projection, h = f (the reference's M = 0, "no RPs")
    ridge: float | None = None  # a fixed lambda; None: chosen per task on the grid below
    ridge_min_exp: int = -8  # the grid 10^min .. 10^max, one value per power of ten
    ridge_max_exp: int = 8
    ridge_fit_fraction: float = 0.8  # the share of the task's rows the grid's fits use; the rest validate
    solve_dtype: Literal["float32", "float64"] = "float32"  # G, C and the solves (the reference: float32)

    def validate(self, key: str) -> None:
        if self.bottleneck < 1:
            raise ConfigError(f"{key}.bottleneck: expected a width >= 1, got {self.bottleneck}")
        if not 0 <= self.adapter_dropout < 1:
            raise ConfigError(f"{key}.adapter_dropout: expected a rate in [0, 1), got {self.adapter_dropout}")
        if self.projection_dim < 0:
            raise ConfigError(f"{key}.projection_dim: expected M >= 0 (0: no projection), got {self.projection_dim}")
        if self.ridge is not None and self.ridge <= 0:
            raise ConfigError(f"{key}.ridge: expected a lambda > 0 or null (chosen on the grid), got {self.ridge}")
        if self.ridge_min_exp > self.ridge_max_exp:
            raise ConfigError(f"{key}.ridge_min_exp: expected <= ridge_max_exp ({self.ridge_max_exp}), got "
                              f"{self.ridge_min_exp}")
        if not 0 < self.ridge_fit_fraction < 1:
            raise ConfigError(f"{key}.ridge_fit_fraction: expected a fraction in (0, 1), got "
                              f"{self.ridge_fit_fraction}")


def gaussian_projection(dim: int, m: int, seed: int) -> torch.Tensor:
    """(dim, m) N(0, 1) entries from a generator of `seed`, drawn on the CPU so that every device gets the same."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(dim, m, generator=g, device="cpu")


def ridge_solve(G: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """(G + lam I)^-1 C by an LU solve (the reference's, for its stability over an explicit inverse)."""
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + lam * eye, C)


def ridge_grid(min_exp: int, max_exp: int) -> list[float]:
    return [10.0 ** e for e in range(min_exp, max_exp + 1)]


def select_ridge(h: torch.Tensor, y: torch.Tensor, grid: list[float], fit_fraction: float) -> tuple[float, list]:
    """The lambda of `grid` whose ridge fit on the first int(fit_fraction N) rows of (h, y) has the lowest mean
    squared error on the rest (the first of equal ones), and the errors (inf where a solve failed)."""
    n_fit = int(h.shape[0] * fit_fraction)
    if n_fit == 0 or n_fit == h.shape[0]:
        raise RuntimeError(f"ranpac: {h.shape[0]} rows leave no fit or no validation rows at "
                           f"ridge_fit_fraction {fit_fraction}")
    hf, yf, hv, yv = h[:n_fit], y[:n_fit], h[n_fit:], y[n_fit:]
    G, C = hf.T @ hf, hf.T @ yf
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    losses = []
    for lam in grid:
        w, info = torch.linalg.solve_ex(G + lam * eye, C)
        loss = F.mse_loss(hv @ w, yv).item() if int(info) == 0 else float("inf")
        losses.append(loss if loss == loss else float("inf"))  # NaN: a failed solve
    best = min(range(len(grid)), key=lambda i: (losses[i], i))
    return grid[best], losses


class RanPACModel(nn.Module):
    """The ViT (with its first-session adapter), the first session's training head, the fixed projection (d, M)
    and the ridge classifier W_o (M, seen): buffers, so that checkpoints carry them."""

    projection: torch.Tensor
    classifier: torch.Tensor

    def __init__(self, backbone: nn.Module, projection: torch.Tensor | None):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.head: CosineHead | None = None
        d = int(cast(int, backbone.num_features))
        self.register_buffer("projection", projection if projection is not None else torch.zeros(d, 0))
        self.register_buffer("classifier", torch.zeros(self.hidden_dim, 0))

    @property
    def hidden_dim(self) -> int:
        return self.projection.shape[1] or self.projection.shape[0]

    def train(self, mode: bool = True) -> RanPACModel:
        """The frozen backbone stays in eval mode; only an active adapter that trains (dropout) follows `mode`."""
        super().train(mode)
        if mode:
            self.backbone.eval()
            for block in blocks_of(self.backbone) if hasattr(self.backbone, "blocks") else []:
                if isinstance(block, AdaptedBlock) and block.active is not None:
                    adapter = block.adapters[block.active]
                    adapter.train(any(p.requires_grad for p in adapter.parameters()))
        return self

    def hidden(self, feats: torch.Tensor) -> torch.Tensor:
        """h = relu(f W), or f itself without a projection."""
        if self.projection.shape[1] == 0:
            return feats
        return F.relu(feats @ self.projection.to(feats.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(self.backbone(x).float())
        return h @ self.classifier.to(h.dtype)


@register_method("ranpac")
class RanPAC(Method[RanPACOptions]):
    settings = frozenset({"class-il"})
    hard_labels = True  # the first session's head sees its task's classes only

    def __init__(self, cfg, scenario, device):
        self.G: torch.Tensor | None = None  # (M, M), summed over every task so far
        self.C: torch.Tensor | None = None  # (M, all classes of the scenario)
        self.ridges: list[float] = []  # the lambda chosen at each task
        super().__init__(cfg, scenario, device)

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.method.first_session == "adapter" and cfg.model.name != "vit":
            raise ConfigError(f"model.name: ranpac's first session trains adapters in a ViT's blocks; expected "
                              f"'vit' (or method.first_session=none), got '{cfg.model.name}'")

    def build_model(self) -> nn.Module:
        backbone = create_backbone(self.cfg.model, self.scenario.train.image_size, self.scenario.train.channels)
        m = self.opts.projection_dim
        d = int(cast(int, backbone.num_features))
        proj = gaussian_projection(d, m, seed_of(self.cfg.run.seed, "ranpac-projection")) if m else None
        return RanPACModel(backbone, proj)

    @property
    def net(self) -> RanPACModel:
        return cast(RanPACModel, self.model)

    @property
    def adapts(self) -> bool:
        return self.opts.first_session == "adapter"

    def begin_task(self, task):
        super().begin_task(task)
        m, o = self.net, self.opts
        if task.index == 0 and self.adapts:
            index = add_adapters(m.backbone, o.bottleneck, o.adapter_scale, o.adapter_dropout)
            set_active_adapter(m.backbone, index)
            m.head = CosineHead(int(cast(int, m.backbone.num_features)), task.num_classes).to(self.device)
        m.requires_grad_(False)  # nothing trains but the first session's adapter and head (setup_phase)
        old = m.classifier
        grown = old.new_zeros(old.shape[0], task.end)
        grown[:, : old.shape[1]] = old
        m.classifier = grown

    def phases(self, task):
        return super().phases(task) if task.index == 0 and self.adapts else []

    def setup_phase(self, phase, task):
        m = self.net
        m.requires_grad_(False)
        for block in blocks_of(m.backbone):
            cast(AdaptedBlock, block).adapters[0].requires_grad_(True)
        cast(CosineHead, m.head).requires_grad_(True)
        m.train()

    def loss(self, batch, phase, task):
        m = self.net
        logits = cast(CosineHead, m.head)(m.backbone(batch.x))
        return F.cross_entropy(logits, batch.y - task.offset), {}

    def embed(self, x):
        return self.net.backbone(x)

    def logits(self, x, task=None):
        return self.net(x)

    # ------------------------------------------------------------------ the closed form
    def consolidate(self, task, ctx):
        m, o = self.net, self.opts
        m.requires_grad_(False)  # the adapter and head are frozen from here on
        m.eval()
        dtype = DTYPES[o.solve_dtype]
        feats = ctx.extract(task.train_idx, lambda x: self.embed(x).float())
        h = m.hidden(feats.to(self.device, dtype))
        labels = self.scenario.train_labels[task.train_idx].to(self.device)
        y = F.one_hot(labels, self.scenario.num_classes).to(dtype)
        if self.G is None or self.C is None:
            self.G = h.new_zeros(h.shape[1], h.shape[1])
            self.C = h.new_zeros(h.shape[1], self.scenario.num_classes)
        self.G += h.T @ h
        self.C += h.T @ y
        if o.ridge is not None:
            lam = o.ridge
        else:  # the reference's loader is shuffled: a permutation of the task's rows from (seed, task)
            g = torch.Generator(device="cpu").manual_seed(seed_of(self.cfg.run.seed, task.index, "ranpac-ridge"))
            order = torch.randperm(h.shape[0], generator=g).to(self.device)
            lam, _ = select_ridge(h[order], y[order], ridge_grid(o.ridge_min_exp, o.ridge_max_exp),
                                  o.ridge_fit_fraction)
        self.ridges.append(lam)
        w = ridge_solve(self.G, self.C, lam)
        m.classifier = w[:, : task.end].float().contiguous()

    # ------------------------------------------------------------------ state and accounting
    def extra_state(self) -> dict:
        return {"G": self.G, "C": self.C, "ridges": list(self.ridges)}

    def load_extra_state(self, state: dict) -> None:
        g, c = state.get("G"), state.get("C")
        self.G = None if g is None else g.to(self.device)
        self.C = None if c is None else c.to(self.device)
        self.ridges = list(state.get("ridges", []))

    def count_parameters(self) -> ParamCount:
        """The backbone and adapter, the first session's head while it trains (task 0), the fixed projection
        (d x M, never trained: counted, it is part of the model at test time) and the ridge classifier (M x seen);
        G and C are state, not parameters."""
        m = self.net
        params = list(m.backbone.parameters()) + (list(m.head.parameters()) if m.head is not None and
                                                  self.task_index == 0 else [])
        total = sum(p.numel() for p in params) + m.projection.numel() + m.hidden_dim * self.seen
        return ParamCount(float(total), float(sum(p.numel() for p in params if p.requires_grad)))
