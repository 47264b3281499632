"""A configurable Vision Transformer (class token or mean pooling), sized for small images by default. Its names are
timm's; `checkpoint_filter_fn` also reads torchvision's and the original release's (.npz) checkpoints."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, Block, PatchEmbed, init_vit_weights, trunc_normal_
from .registry import Backbone, register_model

Pool = Literal["token", "mean"]


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
    pool: Pool = "token"
    norm_eps: float = 1e-5  # the LayerNorms' epsilon; timm's ViTs (and their checkpoints) use 1e-6
    pretrained: str | None = None  # a timm/torchvision state dict, the original release's .npz, or hf_hub:timm/NAME


@register_model("vit")
class VisionTransformer(Backbone):
    Options = ViTOptions

    def __init__(self, img_size: int, in_chans: int, opts: ViTOptions | None = None, **changes):
        super().__init__()
        o = self.options(opts, **changes)
        if o.pool not in get_args(Pool):
            raise ValueError(f"pool must be 'token' or 'mean', got {o.pool!r}")
        embed_dim = o.embed_dim
        self.pool = o.pool
        self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, o.patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if o.pool == "token" else None
        n_tokens = self.patch_embed.num_patches + (1 if o.pool == "token" else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, embed_dim))
        self.pos_drop = nn.Dropout(o.drop)
        rates = [o.drop_path * i / max(o.depth - 1, 1) for i in range(o.depth)]  # no tensor: builds on the meta device
        self.blocks = nn.Sequential(*[
            Block(embed_dim, Attention(embed_dim, o.num_heads, o.qkv_bias, o.attn_drop, o.drop), o.mlp_ratio,
                  o.drop, r, o.norm_eps)
            for r in rates
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=o.norm_eps)
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches (the class token), where inserted prompts go after."""
        return 0 if self.cls_token is None else 1

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the first block's input: patches (and class token) with their position embedding."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_blocks(self, tokens: torch.Tensor,
                       prefixes: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None) -> torch.Tensor:
        """The blocks and the final norm; `prefixes[i]`, when given, are block i's (keys, values) prefix
        (prefix tuning); a shorter list leaves the later blocks without."""
        if prefixes is None:
            return self.norm(self.blocks(tokens))
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, prefixes[i] if i < len(prefixes) else None)
        return self.norm(tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(self.embed_tokens(x))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, D); the classifier lives outside the backbone."""
        return tokens[:, 0] if self.pool == "token" else tokens.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def checkpoint_filter_fn(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A timm, torchvision or original-release state dict -> our names, the position embedding resampled to
        this model's grid (and its class-token slot dropped for a mean-pooled model)."""
        if "embedding/kernel" in sd:
            sd = vit_from_npz(sd)
        elif "conv_proj.weight" in sd:
            sd = vit_from_torchvision(sd)
        if "pos_embed" in sd:
            n_prefix = 1 if self.cls_token is not None else 0
            pe = sd["pos_embed"]
            if n_prefix == 0 and math.isqrt(pe.shape[1] - 1) ** 2 == pe.shape[1] - 1:
                pe = pe[:, 1:]  # a class-token checkpoint into a mean-pooled model
            sd["pos_embed"] = resample_pos_embed(pe, self.pos_embed.shape[1], n_prefix)
        return sd


def vit_from_npz(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original (big_vision / vit_jax) names and layouts -> timm's."""
    out = {"patch_embed.proj.weight": w["embedding/kernel"].permute(3, 2, 0, 1),
           "patch_embed.proj.bias": w["embedding/bias"],
           "cls_token": w["cls"], "pos_embed": w["Transformer/posembed_input/pos_embedding"],
           "norm.weight": w["Transformer/encoder_norm/scale"], "norm.bias": w["Transformer/encoder_norm/bias"]}
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        p, q = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = p + "MultiHeadDotProductAttention_1/"
        out[q + "norm1.weight"], out[q + "norm1.bias"] = w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"]
        out[q + "norm2.weight"], out[q + "norm2.bias"] = w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"]
        out[q + "attn.qkv.weight"] = torch.cat([w[att + f"{n}/kernel"].flatten(1).T for n in ("query", "key", "value")])
        out[q + "attn.qkv.bias"] = torch.cat([w[att + f"{n}/bias"].flatten() for n in ("query", "key", "value")])
        out[q + "attn.proj.weight"] = w[att + "out/kernel"].flatten(0, 1).T
        out[q + "attn.proj.bias"] = w[att + "out/bias"]
        for j, name in ((0, "fc1"), (1, "fc2")):
            out[q + f"mlp.{name}.weight"] = w[p + f"MlpBlock_3/Dense_{j}/kernel"].T
            out[q + f"mlp.{name}.bias"] = w[p + f"MlpBlock_3/Dense_{j}/bias"]
        i += 1
    return out


def vit_from_torchvision(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"patch_embed.proj.weight": w["conv_proj.weight"], "patch_embed.proj.bias": w["conv_proj.bias"],
           "cls_token": w["class_token"], "pos_embed": w["encoder.pos_embedding"],
           "norm.weight": w["encoder.ln.weight"], "norm.bias": w["encoder.ln.bias"]}
    i = 0
    while f"encoder.layers.encoder_layer_{i}.ln_1.weight" in w:
        p, q = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        pairs = {"ln_1": "norm1", "ln_2": "norm2", "self_attention.out_proj": "attn.proj"}
        mlp = ("mlp.0", "mlp.3") if p + "mlp.0.weight" in w else ("mlp.linear_1", "mlp.linear_2")
        pairs.update({mlp[0]: "mlp.fc1", mlp[1]: "mlp.fc2"})
        for a, b in pairs.items():
            out[q + b + ".weight"], out[q + b + ".bias"] = w[p + a + ".weight"], w[p + a + ".bias"]
        out[q + "attn.qkv.weight"] = w[p + "self_attention.in_proj_weight"]
        out[q + "attn.qkv.bias"] = w[p + "self_attention.in_proj_bias"]
        i += 1
    return out


def resample_pos_embed(pe: torch.Tensor, n_tokens: int, n_prefix: int) -> torch.Tensor:
    """(1, n_prefix + g*g, D) -> (1, n_tokens, D): the grid part resampled bicubically (timm's rule)."""
    if pe.shape[1] == n_tokens:
        return pe
    prefix, grid = pe[:, :n_prefix], pe[:, n_prefix:]
    if prefix.shape[1] < n_prefix:  # a checkpoint without class token position for a model with one
        prefix = torch.zeros(1, n_prefix, pe.shape[2], dtype=pe.dtype)
    old, new = int(math.isqrt(grid.shape[1])), int(math.isqrt(n_tokens - n_prefix))
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=new < old)
    return torch.cat([prefix.float(), grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1).to(pe.dtype)
