"""Locality-Preserving Self-Attention (LPA, Zheng et al., ICME 2023; `bwnzheng/LPA_ICME2023` model/convit_lpa.py).

Per head h, with r_ij = (dx, dy, dx^2 + dy^2) the offset from query patch i to key patch j (key - query, patch
units, ConViT's convention) and s_ij = q_i . k_j / sqrt(d):

    A_h = softmax_j( lambda_h * s_ij + v_h . r_ij )

One softmax, no gating (unlike GPSA's mix of two softmaxes). The reference code keeps (v_h, lambda_h) as the rows of
one `pos_proj = Linear(4, H, bias=False)` applied to [r, s]; here the same (H, 4) weight is kept, as `pos_proj.weight`
(columns 0-2: v_h, column 3: lambda_h), so checkpoints and the init recipe read the same, and the layer runs on
`scaled_dot_product_attention`: q is scaled per head by lambda_h and v_h . r is an additive (H, N, N) bias.

Init (the reference's `_init_weights` then `local_init`): every Linear trunc-normal(0.02); value weights the identity;
for the first k*k heads (k = floor(sqrt(H)), 9 of 12) ConViT's local kernel v_h = (2(h2-c), 2(h1-c), -1), times
`locality_strength`; lambda_h ~ trunc-normal(std=lambda_std) (0.02: attention starts almost purely positional).
Truncation is timm's, as in the reference: at +-2 in absolute value, which for these stds is no truncation at all.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .convit import register_sab_attention, relative_positions, split_qk_v
from .layers import trunc_normal_


def local_kernel_(weight: torch.Tensor, num_heads: int, locality_strength: float = 1.0) -> torch.Tensor:
    """ConViT's `local_init` on the first three columns of a (H, >=3) positional weight, in place: head
    h = h1 + k*h2 of a k x k kernel (k = floor(sqrt(H))) looks at offset (h2-c, h1-c) via v_h = (2(h2-c), 2(h1-c), -1).
    Every row (the heads outside the kernel included) is then multiplied by locality_strength, as in ConViT."""
    k = int(num_heads**0.5)
    center = (k - 1) / 2 if k % 2 == 0 else k // 2
    with torch.no_grad():
        for h1 in range(k):
            for h2 in range(k):
                h = h1 + k * h2
                weight[h, 0] = 2 * (h2 - center)
                weight[h, 1] = 2 * (h1 - center)
                weight[h, 2] = -1.0
        weight[:, :3] *= locality_strength
    return weight


class LPSA(nn.Module):
    """Locality-preserving self-attention over patch tokens (B, N, D), N = grid^2 (no class token). The grid is
    read from N at the first forward (or given as num_patches)."""

    owns_init = True  # initialised by its constructor: ConViT's generic init leaves it alone

    def __init__(self, dim: int, num_heads: int, num_patches: int | None = None, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, locality_strength: float = 1.0,
                 lambda_std: float = 0.02, use_local_init: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim, self.dim = num_heads, dim // num_heads, dim
        self.scale = self.head_dim**-0.5
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pos_proj = nn.Linear(4, num_heads, bias=False)  # rows: (v_h[0:3], lambda_h)
        self.locality_strength, self.lambda_std, self.use_local_init = locality_strength, lambda_std, use_local_init
        # r for the grid seen last (built at the first forward when num_patches is not given)
        self.rel_pos: torch.Tensor | None
        self.register_buffer("rel_pos", None, persistent=False)
        if num_patches is not None:
            self.relative_positions(num_patches, None)
        self.reset_parameters()

    def relative_positions(self, n: int, device) -> torch.Tensor:
        r = self.rel_pos
        if r is None or r.shape[0] != n or (device is not None and r.device != device):
            grid = math.isqrt(n)
            if grid * grid != n:
                raise ValueError(f"LPSA needs a square grid of patch tokens, got {n} tokens")
            with torch.inference_mode(False):  # a cached constant that training may use after an evaluation
                r = relative_positions(grid, device)
            self.rel_pos = r
        return r

    def reset_parameters(self) -> None:
        """Every Linear trunc-normal(0.02) with zero bias, then `local_init`."""
        for m in (self.qk, self.v, self.proj, self.pos_proj):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        self.local_init()

    @torch.no_grad()
    def local_init(self) -> None:
        """Value weights = I and ConViT's local kernel on v_h (when use_local_init), then lambda_h ~
        trunc-normal(lambda_std) (exactly 0 for std 0)."""
        if self.use_local_init:
            self.v.weight.copy_(torch.eye(self.dim))
            local_kernel_(self.pos_proj.weight, self.num_heads, self.locality_strength)
        if self.lambda_std > 0:
            trunc_normal_(self.pos_proj.weight[:, 3], std=self.lambda_std)
        else:  # std 0 (the low end of LPA's lambda analysis): lambda_h = 0, a purely positional start
            self.pos_proj.weight[:, 3].zero_()

    @property
    def lambdas(self) -> torch.Tensor:
        """(H,) weights of the content score."""
        return self.pos_proj.weight[:, 3]

    def positional_bias(self, n: int, device=None) -> torch.Tensor:
        """(H, N, N) = v_h . r_ij."""
        r = self.relative_positions(n, device)
        return torch.einsum("ijc,hc->hij", r, self.pos_proj.weight[:, :3])

    def _qkv(self, x: torch.Tensor):
        return split_qk_v(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        q = q * self.lambdas.to(q.dtype).view(1, -1, 1, 1)
        bias = self.positional_bias(N, x.device).to(q.dtype).unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N) attention probabilities, for analyses."""
        q, k, _ = self._qkv(x)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        bias = self.positional_bias(x.shape[1], x.device).unsqueeze(0)
        return (self.lambdas.view(1, -1, 1, 1) * scores + bias).softmax(-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, lambda_std={self.lambda_std}"


@register_sab_attention("lpsa")
def _lpsa(dim, num_heads, qkv_bias, attn_drop, proj_drop, locality_strength, lpsa_lambda_std=0.02, **_):
    return LPSA(dim, num_heads, None, qkv_bias, attn_drop, proj_drop, locality_strength, lpsa_lambda_std)
