"""Transformer building blocks: patch embedding, SDPA attention, MLP, drop-path, pre-norm block, init."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02, *, mean: float = 0.0, a: float = -2.0,
                  b: float = 2.0) -> torch.Tensor:
    """Normal(mean, std) truncated to [a, b], with timm's bounds: a and b are absolute values, not multiples of std
    (timm's `trunc_normal_(std=.02)` cuts at +-2, which at that std is no truncation at all). Sampled in one pass
    by the inverse CDF, as timm does; torch's own `nn.init.trunc_normal_` samples by rejection, which takes ~0.2 s
    per large matrix on a small CPU (16 s to build the 10.7M-parameter DyTox); the distribution is the same.

    For a small std the CDF at the bounds rounds to 0 and 1, where erfinv is infinite: the uniform draw is kept
    inside the open interval (-1, 1) of the tensor's dtype, so every value is finite before the clamp to [a, b]."""
    if not a < b:
        raise ValueError(f"trunc_normal_ needs a < b, got a={a}, b={b}")
    with torch.no_grad():
        lo = math.erf((a - mean) / (std * math.sqrt(2.0)))  # 2 * Phi((a - mean) / std) - 1
        hi = math.erf((b - mean) / (std * math.sqrt(2.0)))
        tensor.uniform_(lo, hi)
        inside = 1.0 - torch.finfo(tensor.dtype).eps / 2  # the largest value below 1 in this dtype
        tensor.clamp_(-inside, inside).erfinv_().mul_(std * math.sqrt(2.0)).add_(mean)
        return tensor.clamp_(a, b)


def init_vit_weights(module: nn.Module) -> None:
    """timm-style init: Linear trunc-normal(0.02) with zero bias, LayerNorm ones/zeros."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class DropPath(nn.Module):
    """Stochastic depth per sample (the whole residual branch is dropped)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution; returns (B, N, D) tokens."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
        self.grid = img_size // patch_size
        self.num_patches = self.grid**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention on torch's scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`prefix`: (keys, values), each (B, P, C), put before the tokens' own keys and values (prefix tuning:
        DualPrompt's and CODA-Prompt's prompts); the output keeps the N query tokens."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if prefix is not None:
            pk, pv = (t.reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in prefix)
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N) attention probabilities, for analyses."""
        B, N, C = x.shape
        q, k, _ = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return (q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)).softmax(-1)


class Block(nn.Module):
    """Pre-norm transformer block; the attention module is given so variants plug in."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        a = self.norm1(x)
        x = x + self.drop_path(self.attn(a) if prefix is None else self.attn(a, prefix))
        return x + self.drop_path(self.mlp(self.norm2(x)))
