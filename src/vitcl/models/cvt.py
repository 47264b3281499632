"""CvT (Wu et al., ICCV 2021, "CvT: Introducing Convolutions to Vision Transformers"; official code microsoft/CvT,
`lib/models/cls_cvt.py`). Stages of: a convolutional token embedding (an overlapping strided conv, then LayerNorm
over the tokens) and pre-norm transformer blocks whose q, k and v come from a convolutional projection (depthwise
3x3 conv + BatchNorm on the token map, then a linear layer; stride 1 for q, `kv_stride` for k and v, the paper's
"squeezed" projection). No positional embedding. The class token joins at the last stage and skips the convolutions;
the features are its final LayerNorm (or the mean of the normalised patch tokens with `pool: mean`).

The defaults are CvT-13 (dims 64/192/384, depths 1/2/10, heads 1/3/6, embeddings 7/4/2 then 3/2/1 twice) as in the
official config; base/cvt-cifar.yaml has the shape for 32 px. docs/methods/cvt.md lists the choices and sources.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .layers import Block, init_vit_weights, trunc_normal_
from .registry import Backbone, register_model


@dataclass
class CvTOptions:
    name: str = "cvt"
    dims: list[int] = field(default_factory=lambda: [64, 192, 384])
    depths: list[int] = field(default_factory=lambda: [1, 2, 10])
    heads: list[int] = field(default_factory=lambda: [1, 3, 6])
    patch_sizes: list[int] = field(default_factory=lambda: [7, 3, 3])  # token-embedding conv kernel per stage
    patch_strides: list[int] = field(default_factory=lambda: [4, 2, 2])
    patch_paddings: list[int] = field(default_factory=lambda: [2, 1, 1])
    mlp_ratio: float = 4.0
    kv_stride: int = 2  # stride of the k/v depthwise convs (q: 1)
    qkv_bias: bool = True
    attn_scale: Literal["dim", "head"] = "dim"  # official code: 1/sqrt(stage width); "head": 1/sqrt(head width)
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.1])  # per stage, 0 -> rate over its blocks
    pool: Literal["token", "mean"] = "token"
    cls_stage: int = -1  # the stage where the class token joins (-1: the last, the paper's); with pool: token

    def validate(self, key: str) -> None:
        n = len(self.dims)
        for name in ("depths", "heads", "patch_sizes", "patch_strides", "patch_paddings", "drop_path"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"{key}.{name}: one value per stage ({n} stages in {key}.dims), "
                                  f"got {getattr(self, name)}")
        if n < 1:
            raise ConfigError(f"{key}.dims: expected at least one stage")
        for d, h in zip(self.dims, self.heads):
            if h < 1 or d % h:
                raise ConfigError(f"{key}.heads: {h} heads do not divide the stage width {d}")
        for name in ("depths", "patch_sizes", "patch_strides"):
            if min(getattr(self, name)) < 1:
                raise ConfigError(f"{key}.{name}: expected positive values, got {getattr(self, name)}")
        if min(self.patch_paddings) < 0:
            raise ConfigError(f"{key}.patch_paddings: expected values >= 0, got {self.patch_paddings}")
        if self.kv_stride < 1:
            raise ConfigError(f"{key}.kv_stride: expected a stride >= 1, got {self.kv_stride}")
        if not all(0.0 <= p < 1.0 for p in self.drop_path):
            raise ConfigError(f"{key}.drop_path: expected rates in [0, 1), got {self.drop_path}")
        if not -n <= self.cls_stage < n:
            raise ConfigError(f"{key}.cls_stage: expected a stage index in [{-n}, {n - 1}], got {self.cls_stage}")


def conv_projection(dim: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 conv (no bias) + BatchNorm on a (B, C, H, W) token map: the spatial half of the projection."""
    return nn.Sequential(nn.Conv2d(dim, dim, 3, stride, 1, groups=dim, bias=False), nn.BatchNorm2d(dim))


class ConvAttention(nn.Module):
    """Multi-head attention on convolutional projections. The class token (if any, first) bypasses the convs and
    joins q, k and v before their linear layers, as in the official code."""

    def __init__(self, dim: int, num_heads: int, kv_stride: int = 2, qkv_bias: bool = True,
                 attn_scale: str = "dim", attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim if attn_scale == "dim" else dim // num_heads) ** -0.5
        self.conv_q, self.conv_k, self.conv_v = (conv_projection(dim, s) for s in (1, kv_stride, kv_stride))
        self.proj_q, self.proj_k, self.proj_v = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def project(self, x: torch.Tensor, h: int, w: int, n_cls: int) -> tuple[torch.Tensor, ...]:
        """(B, n_cls + h*w, C) -> q (B, n_cls + h*w, C), k and v (B, n_cls + h'*w', C) on the strided grid."""
        cls, patches = x[:, :n_cls], x[:, n_cls:]
        grid = patches.transpose(1, 2).unflatten(2, (h, w))
        out = []
        for conv, linear in ((self.conv_q, self.proj_q), (self.conv_k, self.proj_k), (self.conv_v, self.proj_v)):
            tokens = conv(grid).flatten(2).transpose(1, 2)
            out.append(linear(torch.cat([cls, tokens], dim=1)))
        return tuple(out)

    def forward(self, x: torch.Tensor, h: int, w: int, n_cls: int) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (t.unflatten(2, (self.num_heads, -1)).transpose(1, 2) for t in self.project(x, h, w, n_cls))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class CvTBlock(Block):
    """layers.Block whose convolutional attention also takes the token grid (h, w) and the class tokens' count."""

    def forward(self, x: torch.Tensor, h: int, w: int, n_cls: int) -> torch.Tensor:  # type: ignore[override]
        x = x + self.drop_path(self.attn(self.norm1(x), h, w, n_cls))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvEmbed(nn.Module):
    """Overlapping strided conv (with bias) -> LayerNorm over the channels of each token; returns (B, h*w, C)."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class CvTStage(nn.Module):
    """A convolutional token embedding, then the blocks on its tokens (with the class token first, if given)."""

    def __init__(self, in_chans: int, dim: int, o: CvTOptions, i: int):
        super().__init__()
        self.embed = ConvEmbed(in_chans, dim, o.patch_sizes[i], o.patch_strides[i], o.patch_paddings[i])
        self.pos_drop = nn.Dropout(o.drop)
        depth = o.depths[i]
        rates = [o.drop_path[i] * j / max(depth - 1, 1) for j in range(depth)]  # the official per-stage rule
        self.blocks = nn.ModuleList(
            CvTBlock(dim, ConvAttention(dim, o.heads[i], o.kv_stride, o.qkv_bias, o.attn_scale, o.attn_drop, o.drop),
                     o.mlp_ratio, o.drop, r) for r in rates)

    def forward(self, x: torch.Tensor, cls: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
        """(B, C_in, H, W) map -> (B, n_cls + h*w, C) tokens and their grid h, w."""
        tokens, h, w = self.embed(x)
        n_cls = 0 if cls is None else cls.shape[1]
        if cls is not None:
            tokens = torch.cat([cls, tokens], dim=1)
        tokens = self.pos_drop(tokens)
        for blk in self.blocks:
            tokens = blk(tokens, h, w, n_cls)
        return tokens, h, w


@register_model("cvt")
class CvT(Backbone):
    Options = CvTOptions

    def __init__(self, img_size: int, in_chans: int, opts: CvTOptions | None = None, **changes):
        super().__init__()
        o = self.options(opts, **changes)
        o.validate("model")
        n = len(o.dims)
        self.pool = o.pool
        self.cls_stage = o.cls_stage % n if o.pool == "token" else n  # n: no class token
        self.stages = nn.ModuleList(CvTStage(c, d, o, i) for i, (c, d) in enumerate(zip([in_chans] + o.dims, o.dims)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, o.dims[self.cls_stage])) if self.cls_stage < n else None
        # a class token that joins before the last stage is carried across each change of width by a linear map
        self.cls_maps = nn.ModuleList(nn.Linear(o.dims[i - 1], o.dims[i]) for i in range(self.cls_stage + 1, n))
        self.norm = nn.LayerNorm(o.dims[-1])
        self.num_features = self.embed_dim = o.dims[-1]
        self.apply(init_weights)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_cls + h*w, C) tokens of the last stage after the final norm; the class token (if any) first."""
        cls, n_cls = None, 0
        for i, stage in enumerate(self.stages):
            if i == self.cls_stage:
                assert self.cls_token is not None
                cls = self.cls_token.expand(x.shape[0], -1, -1)
            elif cls is not None:
                cls = self.cls_maps[i - self.cls_stage - 1](cls)
            tokens, h, w = stage(x, cls)
            n_cls = 0 if cls is None else 1
            cls = tokens[:, :n_cls] if n_cls else None
            x = tokens[:, n_cls:].transpose(1, 2).unflatten(2, (h, w))
        return self.norm(tokens)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.cls_token is not None else tokens.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def init_weights(module: nn.Module) -> None:
    """The official trunc-normal scheme: Linear trunc-normal(0.02) with zero bias, LayerNorm and BatchNorm ones and
    zeros; convolutions keep torch's default init, as there."""
    init_vit_weights(module)
    if isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
