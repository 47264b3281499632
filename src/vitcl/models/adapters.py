"""Parallel bottleneck adapters on a ViT's blocks (AdaptFormer, Chen et al. 2022), as APER, RanPAC and EASE put
them on a frozen pretrained ViT (docs/methods/adapters.md).

Block i becomes  x' = x + DropPath(Attn(LN1(x)));  out = x' + DropPath(MLP(LN2(x'))) + s * up(drop(relu(down(x'))))
with the adapter reading the MLP's input before its norm and added outside the drop-path, down (D -> r) Kaiming-
uniform (a = sqrt 5) with zero bias and up (r -> D) zero, so that an added adapter starts as the identity. A block
holds a list of adapters and uses the one named by `active` (None: the plain block), so that EASE's one adapter per
task shares one set of frozen weights.
"""
from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn


class Adapter(nn.Module):
    """down -> ReLU -> dropout -> up, times `scale`; the output is zero at initialisation."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.down, self.up = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        self.act, self.drop, self.scale = nn.ReLU(), nn.Dropout(dropout), scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(x)))) * self.scale


class AdaptedBlock(nn.Module):
    """A transformer block (its modules shared, not copied) with parallel adapters on its MLP."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.adapters = nn.ModuleList()
        self.active: int | None = None

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b = cast(Any, self.block)
        a = b.norm1(x)
        x = x + b.drop_path(b.attn(a) if prefix is None else b.attn(a, prefix))
        out = x + b.drop_path(b.mlp(b.norm2(x)))
        return out if self.active is None else out + self.adapters[self.active](x)


def add_adapters(vit: nn.Module, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> int:
    """Wrap each of `vit.blocks` in an AdaptedBlock (once) and give every block one new adapter; returns the new
    adapter's index (0 for the first). The adapters are not active until `set_active_adapter`."""
    blocks = blocks_of(vit)
    for i, block in enumerate(blocks):
        if not isinstance(block, AdaptedBlock):
            blocks[i] = AdaptedBlock(block)
    dim = int(cast(int, vit.num_features))
    device = next(vit.parameters()).device
    for block in blocks:
        adapter = Adapter(dim, bottleneck, scale, dropout).to(device).train(vit.training)
        cast(AdaptedBlock, block).adapters.append(adapter)
    return len(cast(AdaptedBlock, blocks[0]).adapters) - 1


def blocks_of(vit: nn.Module) -> nn.Sequential:
    return cast(nn.Sequential, vit.blocks)


def set_active_adapter(vit: nn.Module, index: int | None) -> None:
    """Use adapter `index` in every block (None: none, the pretrained model)."""
    for block in blocks_of(vit):
        if isinstance(block, AdaptedBlock):
            block.active = index
        elif index is not None:
            raise ValueError("set_active_adapter: the model has no adapters (call add_adapters first)")


def adapter_parameters(vit: nn.Module, index: int) -> list[nn.Parameter]:
    """The parameters of adapter `index` across the blocks."""
    return [p for block in blocks_of(vit) for p in cast(AdaptedBlock, block).adapters[index].parameters()]
