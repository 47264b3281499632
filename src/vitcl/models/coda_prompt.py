"""CODA-Prompt's decomposed prompts (Smith et al., CVPR 2023; docs/methods/coda-prompt.md): per prompted layer a
set of components P_m (length L x dim), keys K_m and attention vectors A_m (key_dim each), split across tasks.
For a query q (the frozen model's class-token feature) the layer's prompt is

    prompt(q) = sum_m alpha_m P_m,     alpha_m = cos(q * A_m, K_m)

split in half along its length into the prefix keys and values of that block (prefix tuning). Each task appends
its own share of components, drawn by Gram-Schmidt orthogonal to the earlier ones; earlier shares are frozen.
"""
from __future__ import annotations

import math
import typing
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def gram_schmidt(old: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Unit rows, one per row of `draws` (n, d), orthogonal to each other and to every row of `old` (k, d).

    The reference subtracts each draw's projection on every earlier row, which is exact when the earlier rows are
    orthogonal; trained components are only nearly so, so here the draws are projected off an orthonormal basis of
    their span (the same result when they are orthogonal) and then off each other, twice for round-off."""
    if draws.is_meta:
        return torch.empty_like(draws)
    k, d = old.shape[0], draws.shape[1]
    if k + draws.shape[0] > d:
        raise ValueError(f"gram_schmidt: {k} + {draws.shape[0]} orthogonal rows do not fit in {d} dimensions")
    basis = torch.linalg.qr(old.double().T).Q if k else draws.new_zeros(d, 0, dtype=torch.float64)
    out = []
    for v in draws.double():
        for _ in range(2):
            v = v - basis @ (basis.T @ v)
        v = v / v.norm()
        basis = torch.cat([basis, v[:, None]], dim=1)
        out.append(v)
    return torch.stack(out).to(draws.dtype)


def ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    """mean((T T^T - I)^2) over the (rows x rows) entries, T flattened to one row per component."""
    t = t.flatten(1)
    return (t @ t.T - torch.eye(t.shape[0], device=t.device, dtype=t.dtype)).square().mean()


def component_weights(q: torch.Tensor, A: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """alpha (B, M): cos(q * A_m, K_m), without the (B, M, d) product: sum_d q A K / (|q * A_m| |K_m|), each norm
    floored at 1e-12 as F.normalize does."""
    num = q @ (A * F.normalize(K, dim=1)).T
    return num / ((q * q) @ (A * A).T).sqrt().clamp_min(1e-12)


class LayerComponents(nn.Module):
    """One layer's components, keys and attention vectors, one parameter per task's share."""

    def __init__(self):
        super().__init__()
        self.p, self.k, self.a = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()

    def grow(self, n: int, length: int, dim: int, key_dim: int, device: torch.device | None = None) -> None:
        like = next(iter(self.p), None)
        device = like.device if like is not None else device
        for store, shape in ((self.p, (length, dim)), (self.k, (key_dim,)), (self.a, (key_dim,))):
            old = torch.cat([t.detach().flatten(1) for t in store]) if len(store) else None
            draws = torch.randn(n, math.prod(shape), device=device)
            new = gram_schmidt(old if old is not None else draws[:0], draws)
            store.append(nn.Parameter(new.reshape(n, *shape)))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, K, A) of every share so far; the earlier shares detached (frozen), as the reference does."""
        def cat(store: nn.ParameterList) -> torch.Tensor:
            parts = list(store)
            return torch.cat([t.detach() for t in parts[:-1]] + parts[-1:])
        return cat(self.p), cat(self.k), cat(self.a)


class CodaPrompt(nn.Module):
    """The prompts of all prompted layers. `add_task()` appends `per_task` components to each layer."""

    def __init__(self, dim: int, key_dim: int, per_task: int, length: int, layers: Sequence[int]):
        super().__init__()
        if length < 2 or length % 2:
            raise ValueError(f"prompt length must be even (keys and values halves), got {length}")
        self.dim, self.key_dim, self.per_task, self.length = dim, key_dim, per_task, length
        self.layer_ids = list(layers)
        self.layers = nn.ModuleList([LayerComponents() for _ in self.layer_ids])

    @property
    def num_tasks(self) -> int:
        return len(self.components()[0].p) if len(self.layers) else 0

    def add_task(self, device: torch.device | None = None) -> None:
        for layer in self.components():
            layer.grow(self.per_task, self.length, self.dim, self.key_dim, device)

    def components(self) -> list[LayerComponents]:
        return [typing.cast(LayerComponents, layer) for layer in self.layers]

    def current_parameters(self) -> list[nn.Parameter]:
        """The newest task's share of every layer (what trains)."""
        return [store[-1] for layer in self.components() for store in (layer.p, layer.k, layer.a)]

    def prefixes(self, q: torch.Tensor, depth: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per block of a `depth`-block ViT: (prefix keys, prefix values) (B, L/2, dim) each, or None."""
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * depth
        half = self.length // 2
        for i, layer in zip(self.layer_ids, self.components()):
            P, K, A = layer.tensors()
            alpha = component_weights(q, A, K)
            prompt = torch.einsum("bm,mld->bld", alpha, P)
            out[i] = (prompt[:, :half], prompt[:, half:])
        return out

    def ortho_loss(self) -> torch.Tensor:
        """Sum over layers of the orthogonality penalties of P (flattened), K and A (all shares so far)."""
        total = torch.zeros(())
        for layer in self.components():
            for t in layer.tensors():
                total = total.to(t.device) + ortho_penalty(t)
        return total
