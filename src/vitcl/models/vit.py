"""A configurable Vision Transformer (class token or mean pooling), sized for small images by default."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import Attention, Block, PatchEmbed, init_vit_weights, trunc_normal_
from .registry import register_model


@dataclass
class ViTOptions:
    name: str = "vit"
    patch_size: int = 4
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    pool: str = "token"  # token | mean
    pretrained: str | None = None  # a local timm/torchvision state dict or the original release's .npz


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int, in_chans: int, patch_size: int = 4, embed_dim: int = 64, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, pool: str = "token"):
        super().__init__()
        if pool not in ("token", "mean"):
            raise ValueError(f"pool must be 'token' or 'mean', got {pool!r}")
        self.pool = pool
        self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if pool == "token" else None
        n_tokens = self.patch_embed.num_patches + (1 if pool == "token" else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # no tensor: builds on the meta device
        self.blocks = nn.Sequential(*[
            Block(embed_dim, Attention(embed_dim, num_heads, qkv_bias, attn_drop, drop), mlp_ratio, drop, r)
            for r in rates
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        return self.norm(self.blocks(x))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, D); the classifier lives outside the backbone."""
        return tokens[:, 0] if self.pool == "token" else tokens.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("vit", ViTOptions)
def build_vit(opts: ViTOptions, img_size: int, in_chans: int) -> VisionTransformer:
    kwargs = {k: v for k, v in vars(opts).items() if k not in ("name", "pretrained")}
    return VisionTransformer(img_size=img_size, in_chans=in_chans, **kwargs)
