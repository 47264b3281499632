"""Swin Transformer (Liu et al., 2021) with timm's state-dict names (timm >= 0.9 layout: the patch merging that
halves the resolution sits at the start of stages 1..n-1 as `layers.i.downsample`), so timm checkpoints load by key;
`checkpoint_filter_fn` converts the original release's and torchvision's layouts.

Window attention runs on scaled_dot_product_attention with the relative position bias and the shifted-window mask
as one additive mask. A feature map that is not a multiple of the window is padded (bottom/right) as in Swin's
detection code; a map no larger than the window gets one window and no shift, as in the original.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layers import DropPath, Mlp, init_vit_weights, trunc_normal_
from .registry import Backbone, register_model


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, ws*ws, C), H and W multiples of ws."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // ws) * (W // ws), ws * ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """(B, nW, ws*ws, C) -> (B, H, W, C)."""
    B, C = windows.shape[0], windows.shape[-1]
    x = windows.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws) index into the (2ws-1)^2 bias table, as in the original code."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]


def shift_mask(H: int, W: int, ws: int, shift: int) -> torch.Tensor:
    """(nW, N, N) additive mask (0 or -100) keeping attention inside the regions a cyclic shift brought together."""
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    for h in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for w in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, h, w, :] = cnt
            cnt += 1
    win = window_partition(img, ws).squeeze(0).squeeze(-1)  # (nW, N)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.window_size = num_heads, window_size
        self.head_dim = dim // num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> torch.Tensor:
        N = self.window_size**2
        index = typing.cast(torch.Tensor, self.relative_position_index)
        bias = self.relative_position_bias_table[index.view(-1)].view(N, N, -1)
        return bias.permute(2, 0, 1)  # (heads, N, N)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, nW, N, C); mask: (nW, N, N) additive or None."""
        B, nW, N, C = x.shape
        qkv = self.qkv(x).reshape(B, nW, N, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nW, heads, N, hd)
        bias = self.position_bias()[None]  # (1, heads, N, N)
        if mask is not None:
            bias = bias + mask[:, None]  # (nW, heads, N, N)
        bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(2, 3).reshape(B, nW, N, C)
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, resolution: tuple[int, int], window_size: int = 7,
                 shift: bool = False, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        ws = window_size
        if min(resolution) <= ws:  # one window covers the map: no partition, no shift (the original rule)
            ws = min(resolution)
            shift = False
        self.window_size, self.shift_size = ws, (ws // 2 if shift else 0)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, ws, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self._masks: dict[tuple, torch.Tensor] = {}

    def mask(self, Hp: int, Wp: int, device) -> torch.Tensor | None:
        if not self.shift_size:
            return None
        key = (Hp, Wp, str(device))
        if key not in self._masks:
            self._masks[key] = shift_mask(Hp, Wp, self.window_size, self.shift_size).to(device)
        return self._masks[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C)."""
        B, H, W, C = x.shape
        ws, s = self.window_size, self.shift_size
        y = self.norm1(x)
        ph, pw = (ws - H % ws) % ws, (ws - W % ws) % ws
        if ph or pw:
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
        Hp, Wp = H + ph, W + pw
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(y, ws), self.mask(Hp, Wp, x.device))
        y = window_reverse(y, ws, Hp, Wp)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        y = y[:, :H, :W]
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (order (0,0), (1,0), (0,1), (1,1) as (row, col)), normed, projected to 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, resolution: tuple[int, int],
                 downsample: bool, window_size: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: list[float]):
        super().__init__()
        self.downsample = PatchMerging(dim) if downsample else nn.Identity()
        if downsample:
            resolution = ((resolution[0] + 1) // 2, (resolution[1] + 1) // 2)
        self.blocks = nn.Sequential(*[
            SwinBlock(out_dim, num_heads, resolution, window_size, shift=j % 2 == 1, mlp_ratio=mlp_ratio,
                      qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop, drop_path=drop_path[j])
            for j in range(depth)])
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H, W, C)


@dataclass
class SwinOptions:
    name: str = "swin"
    patch_size: int = 4
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.1
    patch_norm: bool = True
    pretrained: str | None = None  # a local timm / original-release / torchvision state dict


@register_model("swin")
class SwinTransformer(Backbone):
    Options = SwinOptions

    def __init__(self, img_size: int, in_chans: int, opts: SwinOptions | None = None, **changes):
        super().__init__()
        o = self.options(opts, **changes)
        depths, num_heads, embed_dim, drop = o.depths, o.num_heads, o.embed_dim, o.drop
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        self.patch_embed = PatchEmbed(o.patch_size, in_chans, embed_dim, o.patch_norm)
        self.pos_drop = nn.Dropout(drop)
        res = (max(img_size // o.patch_size, 1),) * 2
        total = sum(depths)
        rates = [o.drop_path * i / max(total - 1, 1) for i in range(total)]
        stages, dim = [], embed_dim
        for i, (d, h) in enumerate(zip(depths, num_heads)):
            out_dim = embed_dim * 2**i
            stage = SwinStage(dim, out_dim, d, h, res, i > 0, o.window_size, o.mlp_ratio, o.qkv_bias, drop,
                              o.attn_drop, rates[sum(depths[:i]): sum(depths[: i + 1])])
            res, dim = stage.resolution, out_dim
            stages.append(stage)
        self.layers = nn.Sequential(*stages)
        self.num_features = dim
        self.norm = nn.LayerNorm(dim)
        self.apply(init_vit_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.pos_drop(self.patch_embed(x))))  # (B, H, W, C)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def checkpoint_filter_fn(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A timm, original-release or torchvision state dict -> our names (merging at the start of a stage), the
        relative-position tables resampled to this model's windows."""
        if any(k.startswith("features.") for k in sd):
            sd = swin_from_torchvision(sd)
        elif any(k.startswith("layers.0.downsample.") for k in sd):  # the original layout: merging ends a stage
            moved = {}
            for k, v in sd.items():
                if k.startswith("layers.") and ".downsample." in k:
                    i = int(k.split(".")[1])
                    k = k.replace(f"layers.{i}.downsample.", f"layers.{i + 1}.downsample.", 1)
                moved[k] = v
            sd = moved
        sd = {k: v for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask"))}
        own = self.state_dict()
        for k, v in list(sd.items()):
            if k.endswith("relative_position_bias_table") and k in own and own[k].shape != v.shape:
                old, new = int(math.isqrt(v.shape[0])), int(math.isqrt(own[k].shape[0]))
                t = v.T.reshape(1, -1, old, old).float()
                t = F.interpolate(t, size=(new, new), mode="bicubic", align_corners=False)
                sd[k] = t.reshape(-1, new * new).T.to(v.dtype)
        return sd


def swin_from_torchvision(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in w.items():
        parts = k.split(".")
        if parts[0] != "features":
            out[k] = v
            continue
        f = int(parts[1])
        rest = ".".join(parts[2:])
        if f == 0:
            out[{"0.weight": "patch_embed.proj.weight", "0.bias": "patch_embed.proj.bias",
                 "2.weight": "patch_embed.norm.weight", "2.bias": "patch_embed.norm.bias"}.get(rest, k)] = v
        elif f % 2 == 0:  # patch merging feeding stage f/2
            out[f"layers.{f // 2}.downsample.{rest}"] = v
        else:
            j, sub = parts[2], ".".join(parts[3:])
            sub = sub.replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            out[f"layers.{f // 2}.blocks.{j}.{sub}"] = v
    return out
