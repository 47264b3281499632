"""CCT (Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact Transformers"; reference code
SHI-Labs/Compact-Transformers): a convolutional tokenizer (conv-ReLU-maxpool blocks), a pre-norm transformer
encoder with a learned positional embedding, and sequence pooling (attention-weighted mean of the output tokens)
instead of a class token. The defaults are CCT-7/3x1 for 32 px: 7 layers, dim 256, 4 heads, MLP ratio 2, one
3x3 tokenizer conv (3.76M parameters with a 10-class head in the paper)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError
from .layers import Attention, Block, init_vit_weights, trunc_normal_
from .registry import Backbone, register_model


@dataclass
class CCTOptions:
    name: str = "cct"
    embed_dim: int = 256
    depth: int = 7
    num_heads: int = 4
    mlp_ratio: float = 2.0
    kernel_size: int = 3  # tokenizer conv kernel (stride 1, padding k // 2), each followed by ReLU + maxpool 3/2
    conv_layers: int = 1
    drop: float = 0.0
    attn_drop: float = 0.1
    drop_path: float = 0.1

    def validate(self, key: str) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"{key}.num_heads: {self.num_heads} does not divide embed_dim {self.embed_dim}")
        if self.conv_layers < 1 or self.depth < 1:
            raise ConfigError(f"{key}.conv_layers/depth: expected >= 1, got {self.conv_layers}/{self.depth}")


def sequence_pool(tokens: torch.Tensor, score: nn.Linear) -> torch.Tensor:
    """(B, N, C) -> (B, C): softmax over tokens of a linear score, then the weighted sum of the tokens."""
    weights = score(tokens).softmax(dim=1)  # (B, N, 1)
    return (weights.transpose(1, 2) @ tokens).squeeze(1)


@register_model("cct")
class CCT(Backbone):
    Options = CCTOptions

    def __init__(self, img_size: int, in_chans: int, opts: CCTOptions | None = None, **changes):
        super().__init__()
        o = self.options(opts, **changes)
        layers: list[nn.Module] = []
        chans = in_chans
        for i in range(o.conv_layers):
            out = o.embed_dim if i == o.conv_layers - 1 else 64  # the reference's in-between width
            layers += [nn.Conv2d(chans, out, o.kernel_size, 1, o.kernel_size // 2, bias=False), nn.ReLU(),
                       nn.MaxPool2d(3, 2, 1)]
            chans = out
        self.tokenizer = nn.Sequential(*layers)
        side = img_size
        for _ in range(o.conv_layers):
            side = (side + 2 - 3) // 2 + 1
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side, o.embed_dim))
        self.pos_drop = nn.Dropout(o.drop)
        rates = torch.linspace(0, o.drop_path, o.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(o.embed_dim, Attention(o.embed_dim, o.num_heads, False, o.attn_drop, o.drop), o.mlp_ratio,
                  o.drop, rates[i]) for i in range(o.depth))
        self.norm = nn.LayerNorm(o.embed_dim)
        self.attention_pool = nn.Linear(o.embed_dim, 1)
        self.num_features = self.embed_dim = o.embed_dim
        self.apply(init_vit_weights)
        trunc_normal_(self.pos_embed, std=0.2)  # the reference's positional-embedding std
        for m in self.tokenizer:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens after the encoder and the final norm."""
        x = self.pos_drop(self.tokenizer(x).flatten(2).transpose(1, 2) + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return sequence_pool(tokens, self.attention_pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
