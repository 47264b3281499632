"""Parameter-efficient tuning of a frozen ViT beside the adapters of models/adapters.py: visual prompt tuning (VPT,
Jia et al. 2022) and scale-and-shift features (SSF, Lian et al. 2022), as APER tunes its first session with them
(docs/methods/aper.md). Each can be switched off, so that one backbone gives both the pretrained and the adapted
features.

VPT: P learnt tokens go after the image's tokens (they carry no position embedding). Shallow: one set, put in
before the first block and dropped after the last. Deep: block i gets its own set, put in before it and dropped
after it, so each block's prompt outputs are replaced by the next block's prompts. With attention the order of
the tokens does not matter, so putting them last is the same as LAMDA-PILOT's prepending; the class token stays
at index 0 and mean pooling never sees a prompt.

SSF: after every Linear and LayerNorm of the blocks, the patch projection and the final norm, y <- y * gamma + beta
per channel, gamma ~ N(1, 0.02) and beta ~ N(0, 0.02) (SSF's init_ssf_scale_shift).
"""
from __future__ import annotations

from typing import Any, Literal, cast

import torch
from torch import nn

PromptInit = Literal["zeros", "xavier"]


class VisualPrompts(nn.Module):
    """`layers` sets of `length` prompt tokens of width `dim`: (layers, length, dim); layers 1 is shallow VPT."""

    def __init__(self, layers: int, length: int, dim: int, init: PromptInit = "zeros"):
        super().__init__()
        self.prompts = nn.Parameter(torch.zeros(layers, length, dim))
        if init == "xavier":
            for i in range(layers):  # each set as LAMDA-PILOT's vit_adapter.py draws its (1, P, D) embeddings
                nn.init.xavier_uniform_(self.prompts.data[i:i + 1])
        elif init != "zeros":
            raise ValueError(f"prompt init must be 'zeros' or 'xavier', got {init!r}")
        self.active = True

    @property
    def deep(self) -> bool:
        return self.prompts.shape[0] > 1

    @property
    def length(self) -> int:
        return self.prompts.shape[1]


def vpt_features(vit: nn.Module, x: torch.Tensor, prompts: VisualPrompts) -> torch.Tensor:
    """The pooled embedding (B, D) of `vit` with the prompts in (shallow: one set over all blocks; deep: one set per
    block, replaced at each)."""
    v = cast(Any, vit)
    tokens = v.embed_tokens(x)
    n, p = tokens.shape[1], prompts.prompts.to(tokens.dtype)
    blocks = list(v.blocks)
    if prompts.deep and p.shape[0] != len(blocks):
        raise ValueError(f"deep VPT has {p.shape[0]} prompt sets for {len(blocks)} blocks")
    if prompts.deep:
        for i, block in enumerate(blocks):
            tokens = block(torch.cat([tokens, p[i].expand(tokens.shape[0], -1, -1)], dim=1))[:, :n]
    else:
        tokens = torch.cat([tokens, p[0].expand(tokens.shape[0], -1, -1)], dim=1)
        for block in blocks:
            tokens = block(tokens)
        tokens = tokens[:, :n]
    return v.forward_head(v.norm(tokens))


def init_ssf(dim: int) -> tuple[nn.Parameter, nn.Parameter]:
    scale, shift = nn.Parameter(torch.empty(dim)), nn.Parameter(torch.empty(dim))
    nn.init.normal_(scale, mean=1.0, std=0.02)
    nn.init.normal_(shift, mean=0.0, std=0.02)
    return scale, shift


class SSF(nn.Module):
    """`inner` (a Linear, LayerNorm or patch Conv2d, its weights untouched) followed by a per-channel scale and
    shift; with `active` False it is `inner` alone."""

    def __init__(self, inner: nn.Module, dim: int):
        super().__init__()
        self.inner = inner
        self.scale, self.shift = init_ssf(dim)
        self.active = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if not self.active:
            return y
        if isinstance(self.inner, nn.Conv2d):  # channels first
            return y * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        return y * self.scale + self.shift


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return int(cast(nn.LayerNorm, module).normalized_shape[-1])


def add_ssf(vit: nn.Module) -> list[str]:
    """Wrap, in place, the patch projection, every Linear and LayerNorm inside the blocks and the final norm in an
    SSF (once); returns the wrapped modules' names."""
    v = cast(Any, vit)
    targets = [("patch_embed.proj", v.patch_embed.proj), ("norm", v.norm)]
    for i, block in enumerate(v.blocks):
        targets += [(f"blocks.{i}.{n}", m) for n, m in block.named_modules()
                    if isinstance(m, (nn.Linear, nn.LayerNorm)) and n]
    names = []
    for name, module in targets:
        if isinstance(module, SSF) or name.endswith(".inner"):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = vit.get_submodule(parent_name) if parent_name else vit
        if isinstance(parent, SSF):
            continue
        w = next(iter(module.parameters()), None)
        ssf = SSF(module, _channels(module))
        if w is not None:
            ssf.to(device=w.device, dtype=w.dtype)
        setattr(parent, leaf, ssf)
        names.append(name)
    return names


def ssf_modules(vit: nn.Module) -> list[SSF]:
    return [m for m in vit.modules() if isinstance(m, SSF)]


def set_ssf_active(vit: nn.Module, active: bool) -> None:
    for m in ssf_modules(vit):
        m.active = active


def ssf_parameters(vit: nn.Module) -> list[nn.Parameter]:
    return [p for m in ssf_modules(vit) for p in (m.scale, m.shift)]
