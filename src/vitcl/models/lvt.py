"""LVT's backbone: inter-task attention and a compact hybrid (convolutional stem + transformer stages) ViT.

Inter-task attention (Wang et al., CVPR 2022) keeps queries and values from the input tokens but replaces the
keys X·W_K by a learnable *external* key matrix K_W, one key per token position, and adds a learnable attention
bias B:

    A = softmax(Q K_Wᵀ / √d + B),   out = A V,   Q = X W_Q,  V = X W_V

Shapes chosen here (the paper's per-head layout is not available to us; see docs/methods/lvt.md#inter-task-attention):
    K_W: (H, N, d_h)  one key per head and token position (the multi-head version of "one key per position");
    B:   (H, N, N)    one bias per head and (query position, key position) pair.
Both are input-independent parameters, which is what makes them cheap to consolidate: the method estimates their
importance after each task and penalises moving them while learning the next.

It runs on torch's scaled_dot_product_attention: K_W is expanded (a view, no copy) over the batch, and B is the
additive float `attn_mask`, broadcast over the batch. The parameter count of an attention layer is
3·C² (+biases) for W_Q, W_V and the output projection, plus N·C for K_W and H·N² for B, against 4·C² for
self-attention: fewer whenever N·C + H·N² < C², e.g. in the later, coarser stages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .layers import Block, init_vit_weights, trunc_normal_
from .registry import Backbone, register_model


class InterTaskAttention(nn.Module):
    """softmax(Q K_Wᵀ/√d_h + B) V over a fixed number of token positions (see the module docstring)."""

    def __init__(self, dim: int, num_tokens: int, num_heads: int, qv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, key_std: float = 0.02):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.num_tokens = num_heads, num_tokens
        self.head_dim = dim // num_heads
        self.qv = nn.Linear(dim, 2 * dim, bias=qv_bias)
        self.external_key = nn.Parameter(torch.empty(num_heads, num_tokens, self.head_dim))  # K_W
        self.attn_bias = nn.Parameter(torch.zeros(num_heads, num_tokens, num_tokens))  # B
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.key_std = key_std
        trunc_normal_(self.external_key, std=key_std)

    def _qv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        if N != self.num_tokens:
            raise ValueError(f"inter-task attention holds {self.num_tokens} keys (one per token position), "
                             f"got {N} tokens")
        q, v = self.qv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, v  # (B, H, N, d_h) each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, v = self._qv(x)
        k = self.external_key.to(q.dtype).unsqueeze(0).expand(B, -1, -1, -1)
        mask = self.attn_bias.to(q.dtype).unsqueeze(0)  # additive, broadcast over the batch
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N) attention probabilities, for analyses."""
        q, _ = self._qv(x)
        logits = q @ self.external_key.to(q.dtype).transpose(-2, -1) / math.sqrt(self.head_dim)
        return (logits + self.attn_bias.to(q.dtype)).softmax(-1)


def conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class Stage(nn.Module):
    """An entry convolution (3×3, strided: the stage's downsampling and width change), then transformer blocks
    with inter-task attention on the resulting token grid."""

    def __init__(self, cin: int, dim: int, stride: int, grid_in: int, depth: int, heads: int, mlp_ratio: float,
                 qv_bias: bool, drop: float, attn_drop: float, drop_paths: list[float], key_std: float):
        super().__init__()
        self.entry = nn.Conv2d(cin, dim, 3, stride, 1)
        self.grid = (grid_in - 1) // stride + 1
        self.norm = nn.LayerNorm(dim)
        n = self.grid * self.grid
        self.blocks = nn.Sequential(*[
            Block(dim, InterTaskAttention(dim, n, heads, qv_bias, attn_drop, drop, key_std), mlp_ratio, drop, r)
            for r in drop_paths
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)  # (B, C, g, g)
        B, C, H, W = x.shape
        x = self.blocks(self.norm(x.flatten(2).transpose(1, 2)))
        return x.transpose(1, 2).reshape(B, C, H, W)


@dataclass
class LVTOptions:
    name: str = "lvt"
    stem: list[int] = field(default_factory=lambda: [64])  # channels of the 3×3 conv-BN-GELU stem layers
    stem_strides: list[int] = field(default_factory=lambda: [1])
    dims: list[int] = field(default_factory=lambda: [128, 256, 512])  # token width of each stage
    depths: list[int] = field(default_factory=lambda: [2, 2, 2])
    heads: list[int] = field(default_factory=lambda: [2, 4, 8])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])  # entry-conv stride of each stage
    mlp_ratio: float = 4.0
    qv_bias: bool = True
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    key_std: float = 0.02  # init std of the external keys K_W (B starts at zero)

    def validate(self, key: str) -> None:
        if len(self.stem) != len(self.stem_strides):
            raise ConfigError(f"{key}.stem_strides: one stride per stem layer ({len(self.stem)}), "
                              f"got {len(self.stem_strides)}")
        n = len(self.dims)
        for name in ("depths", "heads", "strides"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"{key}.{name}: one value per stage ({n} stages in {key}.dims), "
                                  f"got {getattr(self, name)}")
        for d, h in zip(self.dims, self.heads):
            if h < 1 or d % h:
                raise ConfigError(f"{key}.heads: {h} heads do not divide the stage width {d}")
        if any(s < 1 for s in self.stem_strides + self.strides):
            raise ConfigError(f"{key}.strides: strides must be positive")


@register_model("lvt")
class LVTNet(Backbone):
    """Conv stem -> stages (entry conv + inter-task attention blocks) -> LayerNorm -> mean over tokens."""

    Options = LVTOptions

    def __init__(self, img_size: int, in_chans: int, opts: LVTOptions | None = None, **changes):
        super().__init__()
        o = self.options(opts, **changes)
        layers, cin, grid = [], in_chans, img_size
        for c, s in zip(o.stem, o.stem_strides):
            layers.append(conv_bn(cin, c, s))
            cin, grid = c, (grid - 1) // s + 1
        self.stem = nn.Sequential(*layers)
        rates = torch.linspace(0, o.drop_path, sum(o.depths)).tolist()
        self.stages = nn.ModuleList()
        start = 0
        for dim, depth, h, s in zip(o.dims, o.depths, o.heads, o.strides):
            stage = Stage(cin, dim, s, grid, depth, h, o.mlp_ratio, o.qv_bias, o.drop, o.attn_drop,
                          rates[start:start + depth], o.key_std)
            self.stages.append(stage)
            cin, grid, start = dim, stage.grid, start + depth
        self.norm = nn.LayerNorm(cin)
        self.num_features = cin
        self.grids = [st.grid for st in self.stages]
        self.apply(init_vit_weights)  # Linear/LayerNorm; K_W and B keep their own init

    def attention_layers(self) -> list[InterTaskAttention]:
        return [m for m in self.modules() if isinstance(m, InterTaskAttention)]

    def consolidated_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters LVT consolidates across tasks: every K_W and B, by name."""
        return {n: p for n, p in self.named_parameters() if n.endswith(("external_key", "attn_bias"))}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, N, C)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
