"""ConViT blocks and the DyTox encoder/decoder: GPSA, class attention, the batched task-attention decoder.

Pieces, smallest first (all attention on torch's scaled_dot_product_attention where the math allows):
- `relative_positions(grid)`: r_ij = (dx, dy, dx^2 + dy^2) with d = key - query in patch units.
- `GPSA`: ConViT's gated positional self-attention,
      A_h = (1 - s(g_h)) softmax(q_h k_h^T / sqrt(d)) + s(g_h) softmax(pos_proj(r)_h),
  computed as (1 - s(g)) SDPA(q, k, v) + s(g) P v with P the input-independent positional attention. The public
  code also divides every row by its sum; the rows of a convex mix of two softmaxes already sum to one, so that
  step is a numeric no-op and is left out. Local init: value weights = I, the first int(sqrt(H))^2 heads get a
  kernel of offsets (9 of 12 heads: 3x3), locality strength 1.
- `ClassAttention`: CaiT class attention; the query comes from the token only, keys and values from
  [token; patches] (the token attends to itself). Given T tokens at once, token i attends to [token i; patches]:
  one SDPA call over the keys [tokens; patches] with a mask hiding the other tokens. The patches' keys and values
  are computed once for all tokens.
- `TaskAttentionBlock` (TAB): pre-norm class-attention block that updates the tokens only.
- `TaskDecoder`: the TABs over T task tokens; `mode="batched"` runs all tokens in one call per block,
  `mode="loop"` runs one token at a time (the public DyTox code), for tests and benchmarks.
- `ConViTEncoder`: patch embedding + positional embedding (no class token) + the self-attention blocks (SABs).
- `ConViT`: encoder + decoder + one class token and a final norm: the standalone backbone `convit`.

Drop-path in the decoder: the public per-task loop draws an independent drop-path mask for every task forward,
so in the batched decoder each (sample, token) pair gets its own mask by default (`per_token`, the same as LPA's
`sep_droppath`). `shared` drops all task tokens of a sample together, as DyTox's single-call `JointCA` did
(the variant its author found "about 2 points worse").

SAB attention types live in a registry (`SAB_ATTENTIONS`: gpsa, mhsa; lpsa from `lpsa.py`) so that other variants
plug in by name; each SAB may use its own (`sab_layers`, e.g. LPA's "the first k layers are LPSA").
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .layers import Attention, Block, DropPath, Mlp, PatchEmbed, init_vit_weights, trunc_normal_
from .registry import Backbone, register_model
from .vit import resample_pos_embed, vit_from_npz, vit_from_torchvision

SAB_ATTENTIONS: Registry = Registry("SAB attention")
DecoderMode = Literal["batched", "loop"]
DecoderDropPath = Literal["per_token", "shared"]


def register_sab_attention(name: str):
    """Register fn(dim, num_heads, qkv_bias, attn_drop, proj_drop, locality_strength, **options) -> module
    (B,N,C)->(B,N,C); `options` are model options meant for one variant (lpsa_lambda_std), ignored by the others.
    A module that initialises itself (a local init, say) sets `owns_init = True` so ConViT leaves it alone;
    otherwise ConViT gives its Linears trunc-normal(0.02) weights and zero biases."""
    return SAB_ATTENTIONS.register(name)


# --------------------------------------------------------------------------------------------- positions
def relative_positions(grid: int, device=None) -> torch.Tensor:
    """(N, N, 3) with N = grid^2 patches in row-major order: r[q, k] = (dx, dy, dx^2 + dy^2), d = key - query.

    x is the column of a patch, y its row, both in patch units (ConViT's `get_rel_indices`)."""
    idx = torch.arange(grid, device=device)
    y, x = torch.meshgrid(idx, idx, indexing="ij")
    x, y = x.flatten(), y.flatten()
    dx = (x[None, :] - x[:, None]).float()
    dy = (y[None, :] - y[:, None]).float()
    return torch.stack([dx, dy, dx**2 + dy**2], dim=-1)


def _grid_of(n: int) -> int:
    grid = int(round(math.sqrt(n)))
    if grid * grid != n:
        raise ValueError(f"positional attention needs a square grid of patches, got {n} tokens")
    return grid


# --------------------------------------------------------------------------------------------- GPSA

def split_qk_v(attn: typing.Any, x: torch.Tensor):
    """Per-head q, k, v (B, H, N, d) from ConViT's fused `qk` and separate `v` projections (GPSA, LPSA)."""
    B, N, _ = x.shape
    q, k = attn.qk(x).reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    v = attn.v(x).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    return q, k, v

class GPSA(nn.Module):
    """Gated positional self-attention (ConViT). Parameters as in the public code: qk (no bias), v (no bias),
    proj, pos_proj Linear(3, H), gating_param ones(H). Initialises itself (trunc-normal 0.02, then the local init),
    so containers leave it alone (`owns_init`)."""

    owns_init = True

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, locality_strength: float = 1.0, use_local_init: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pos_proj = nn.Linear(3, num_heads)
        self.gating_param = nn.Parameter(torch.ones(num_heads))
        self.locality_strength = locality_strength
        self.use_local_init = use_local_init
        self.rel_indices: torch.Tensor | None
        self.register_buffer("rel_indices", None, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_vit_weights)
        if self.use_local_init:
            self.local_init(self.locality_strength)

    @torch.no_grad()
    def local_init(self, locality_strength: float = 1.0) -> None:
        """v = I; head h1 + k*h2 (k = int(sqrt(H))) gets pos_proj weight (2(h2-c), 2(h1-c), -1), c the kernel
        centre; then the whole pos_proj weight is scaled by the locality strength (public code)."""
        self.v.weight.copy_(torch.eye(self.dim))
        k = int(self.num_heads**0.5)
        c = (k - 1) / 2 if k % 2 == 0 else k // 2
        w = self.pos_proj.weight
        for h1 in range(k):
            for h2 in range(k):
                w[h1 + k * h2] = torch.tensor([2.0 * (h2 - c), 2.0 * (h1 - c), -1.0])
        w.mul_(locality_strength)

    def relative_indices(self, n: int, device) -> torch.Tensor:
        r = self.rel_indices
        dtype = self.pos_proj.weight.dtype
        if torch.compiler.is_compiling():  # a constant of the graph: caching it would mutate a buffer (a recompile)
            return relative_positions(_grid_of(n), device).to(dtype)
        if r is None or r.shape[0] != n or r.device != device or r.dtype != dtype:
            with torch.inference_mode(False):  # a cached constant that training may use after an evaluation
                r = relative_positions(_grid_of(n), device).to(dtype)
            self.rel_indices = r
        return r

    def positional_attention(self, n: int, device) -> torch.Tensor:
        """(H, N, N): softmax over keys of pos_proj(r), the same for every input."""
        r = self.relative_indices(n, device)
        return self.pos_proj(r).permute(2, 0, 1).softmax(dim=-1)

    def _qkv(self, x: torch.Tensor):
        return split_qk_v(self, x)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N) mixed attention probabilities, for analyses (non-locality)."""
        B, N, _ = x.shape
        q, k, _ = self._qkv(x)
        content = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1)
        g = torch.sigmoid(self.gating_param).view(1, -1, 1, 1)
        return (1 - g) * content + g * self.positional_attention(N, x.device).to(content.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        g = torch.sigmoid(self.gating_param).view(1, -1, 1, 1)
        if self.training and self.attn_drop > 0:
            # one dropout mask on the mixed attention, as in the public code: no fused kernel for that
            attn = F.dropout(self.attention_map(x), self.attn_drop)
            out = attn.to(v.dtype) @ v
        else:
            content = F.scaled_dot_product_attention(q, k, v)
            pos = self.positional_attention(N, x.device).to(v.dtype)
            out = (1 - g).to(v.dtype) * content + g.to(v.dtype) * (pos @ v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


@register_sab_attention("gpsa")
def _gpsa(dim, num_heads, qkv_bias, attn_drop, proj_drop, locality_strength, **_):
    return GPSA(dim, num_heads, qkv_bias, attn_drop, proj_drop, locality_strength)


@register_sab_attention("mhsa")
def _mhsa(dim, num_heads, qkv_bias, attn_drop, proj_drop, locality_strength, **_):
    return Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)


# --------------------------------------------------------------------------------------------- class attention
class ClassAttention(nn.Module):
    """CaiT class attention: q from the token(s), k and v from [token; patches]; separate q, k, v Linears (no bias
    by default) and proj, as in the public code.

    forward(tokens (B, T, C), patches (B, N, C)), both already normalised: token i attends to [token i; patches]
    only, never to the other tokens. T = 1 is CaiT's class attention."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._mask_cache: dict = {}

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def token_mask(self, t: int, n: int, device) -> torch.Tensor:
        """(T, T + N) bool, True where query token i may attend: itself and every patch."""
        if torch.compiler.is_compiling():  # built in the graph, for any T: a cache keyed by T would fix it
            cols = torch.arange(t + n, device=device)
            return (cols[None, :] == torch.arange(t, device=device)[:, None]) | (cols[None, :] >= t)
        key = (t, n, str(device))
        mask = self._mask_cache.get(key)
        if mask is None:
            with torch.inference_mode(False):  # cached: training may use it after an evaluation
                mask = torch.cat([torch.eye(t, dtype=torch.bool, device=device),
                                  torch.ones(t, n, dtype=torch.bool, device=device)], dim=1)
            self._mask_cache = {key: mask}
        return mask

    def forward(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        B, T, C = tokens.shape
        N = patches.shape[1]
        q = self._heads(self.q(tokens))
        k = torch.cat([self._heads(self.k(tokens)), self._heads(self.k(patches))], dim=2)
        v = torch.cat([self._heads(self.v(tokens)), self._heads(self.v(patches))], dim=2)
        mask = None if T == 1 else self.token_mask(T, N, tokens.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))

    def attention_map(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(B, H, T, T + N) probabilities of each token over [tokens; patches] (0 on the other tokens), for
        analyses (attention heat maps)."""
        T, N = tokens.shape[1], patches.shape[1]
        q = self._heads(self.q(tokens))
        k = torch.cat([self._heads(self.k(tokens)), self._heads(self.k(patches))], dim=2)
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
        if T > 1:
            scores = scores.masked_fill(~self.token_mask(T, N, tokens.device), float("-inf"))
        return scores.softmax(-1)


class TokenDropPath(DropPath):
    """Drop-path on (B, T, C) tokens: one mask per sample and token (`per_token`) or per sample (`shared`)."""

    def __init__(self, p: float = 0.0, per_token: bool = True):
        super().__init__(p)
        self.per_token = per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0], x.shape[1], 1) if self.per_token else (x.shape[0], 1, 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}, per_token={self.per_token}"


class TaskAttentionBlock(nn.Module):
    """Pre-norm TAB: tokens += DropPath(CA(LN(tokens), LN(patches))); tokens += DropPath(MLP(LN(tokens))).
    The patches are not updated; the same LayerNorm normalises tokens and patches (CaiT: LN over all tokens)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, per_token_drop_path: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = TokenDropPath(drop_path, per_token_drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.drop_path(self.attn(self.norm1(tokens), self.norm1(patches)))
        return tokens + self.drop_path(self.mlp(self.norm2(tokens)))


class TaskDecoder(nn.Module):
    """The TABs applied to T task tokens over shared patch tokens -> (B, T, C) task embeddings."""

    MODES = get_args(DecoderMode)

    def __init__(self, blocks: typing.Sequence[nn.Module], mode: DecoderMode = "batched"):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"decoder mode must be one of {self.MODES}, got {mode!r}")
        self.blocks = nn.ModuleList(blocks)
        self.mode = mode

    def _run(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            tokens = blk(tokens, patches)
        return tokens

    def forward(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """tokens (1 or B, T, C), patches (B, N, C)."""
        tokens = tokens.expand(patches.shape[0], -1, -1)
        if self.mode == "loop":
            return torch.cat([self._run(tokens[:, i:i + 1], patches) for i in range(tokens.shape[1])], dim=1)
        return self._run(tokens, patches)


# --------------------------------------------------------------------------------------------- encoder, backbone
def _init_tree(module: nn.Module) -> None:
    """init_vit_weights on every submodule, except the subtrees of modules marked `owns_init` (GPSA: already
    initialised by its constructor, local init included)."""
    if getattr(module, "owns_init", False):
        return
    init_vit_weights(module)
    for child in module.children():
        _init_tree(child)


class ConViTEncoder(nn.Module):
    """Patch embedding (conv, PyTorch's default init) + positional embedding (trunc-normal 0.02, no class token)
    + the self-attention blocks. forward(x) -> (B, N, C) patch tokens."""

    def __init__(self, img_size: int, in_chans: int, patch_size: int, embed_dim: int,
                 blocks: typing.Sequence[nn.Module], drop: float = 0.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return x


@dataclass
class ConViTOptions:
    """DyTox's ConViT (`options/model/cifar_dytox.yaml`): 5 GPSA SABs + 1 class-attention TAB, dim 384, 12 heads,
    patch 4 on 32 px (patch 16 on 224 px for ImageNet)."""

    name: str = "convit"
    patch_size: int = 4
    embed_dim: int = 384
    depth: int = 6  # all blocks: local_up_to_layer SABs, then depth - local_up_to_layer TABs (class attention)
    local_up_to_layer: int = 5
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.1  # linear from 0 over all `depth` blocks: [0, .02, .04, .06, .08, .1] for DyTox
    locality_strength: float = 1.0
    sab: str = "gpsa"  # attention of the SABs: gpsa | mhsa (plain multi-head self-attention) | lpsa (LPA) | others
    # per-SAB attention, overriding `sab` (one name per SAB, e.g. LPA's first 2 of 5 layers LPSA:
    # [lpsa, lpsa, gpsa, gpsa, gpsa]); empty: every SAB uses `sab`
    sab_layers: list[str] = field(default_factory=list)
    lpsa_lambda_std: float = 0.02  # LPSA only: std of the truncated normal drawing each head's content weight
    decoder: DecoderMode = "batched"  # batched: all task tokens in one call per TAB | loop: one token at a time
    decoder_drop_path: DecoderDropPath = "per_token"  # per_token (= the public per-task loop) | shared (JointCA)
    # a local checkpoint: this model's own state dict, or a ViT's (timm names) whose blocks become the SABs (with
    # sab: mhsa), its patch and position embedding the encoder's; the decoder keeps its initialisation
    pretrained: str | None = None

    def validate(self, key: str) -> None:
        if self.sab not in SAB_ATTENTIONS:
            raise ConfigError(f"{key}.sab: unknown '{self.sab}'; expected one of: {', '.join(SAB_ATTENTIONS.names())}")
        for i, name in enumerate(self.sab_layers):
            if name not in SAB_ATTENTIONS:
                raise ConfigError(f"{key}.sab_layers[{i}]: unknown '{name}'; expected one of: "
                                  f"{', '.join(SAB_ATTENTIONS.names())}")
        if self.sab_layers and len(self.sab_layers) != self.local_up_to_layer:
            raise ConfigError(f"{key}.sab_layers: {len(self.sab_layers)} names for {self.local_up_to_layer} SABs "
                              f"(local_up_to_layer); give one per SAB")
        if self.lpsa_lambda_std < 0:
            raise ConfigError(f"{key}.lpsa_lambda_std: expected a value >= 0, got {self.lpsa_lambda_std}")
        if self.decoder == "loop" and self.decoder_drop_path == "shared":
            raise ConfigError(f"{key}.decoder_drop_path: 'shared' needs the batched decoder (a loop draws one mask "
                              f"per token)")
        if not 0 <= self.local_up_to_layer < self.depth:
            raise ConfigError(f"{key}.local_up_to_layer: expected 0 <= {self.local_up_to_layer} < depth "
                              f"{self.depth} (at least one task-attention block)")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"{key}.num_heads: {self.num_heads} does not divide embed_dim {self.embed_dim}")


@register_model("convit")
class ConViT(Backbone):
    """Encoder (SABs over patches) + decoder (TABs over a class token) + final norm: a standalone backbone.
    DyTox takes the encoder, the decoder and the class token (its first task token) from it."""

    Options = ConViTOptions

    def __init__(self, img_size: int, in_chans: int, opts: ConViTOptions | None = None, **changes):
        super().__init__()
        o = self.options(opts, **changes)
        embed_dim, num_heads, mlp_ratio, qkv_bias, drop = o.embed_dim, o.num_heads, o.mlp_ratio, o.qkv_bias, o.drop
        rates = torch.linspace(0, o.drop_path, o.depth).tolist()
        kinds = list(o.sab_layers) or [o.sab] * o.local_up_to_layer
        if len(kinds) != o.local_up_to_layer:
            raise ValueError(f"sab_layers names {len(kinds)} attentions for {o.local_up_to_layer} SABs")
        sabs = [Block(embed_dim, SAB_ATTENTIONS.get(kind, "model.sab")(
                    embed_dim, num_heads, qkv_bias, o.attn_drop, drop, o.locality_strength,
                    lpsa_lambda_std=o.lpsa_lambda_std), mlp_ratio, drop, rates[i])
                for i, kind in enumerate(kinds)]
        tabs = [TaskAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop, o.attn_drop, rates[i],
                                   per_token_drop_path=o.decoder_drop_path == "per_token")
                for i in range(o.local_up_to_layer, o.depth)]
        self.num_features = self.embed_dim = embed_dim
        self.encoder = ConViTEncoder(img_size, in_chans, o.patch_size, embed_dim, sabs, drop)
        self.decoder = TaskDecoder(tabs, o.decoder)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.norm = nn.LayerNorm(embed_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Linear trunc-normal(0.02) with zero bias, LayerNorm ones/zeros, then the GPSA local init (which must
        come after, as in the public code); patch-embedding conv keeps PyTorch's default init."""
        trunc_normal_(self.encoder.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for part in (self.encoder.blocks, self.decoder, self.norm):
            _init_tree(part)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) patch tokens after the SABs."""
        return self.encoder(x)

    def checkpoint_filter_fn(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A ViT checkpoint (timm names; the original release's and torchvision's are converted first) -> the
        encoder: block i -> SAB i (extra blocks are left out), patch embedding, position embedding without the class
        token's slot and resampled to this grid, class token -> the first task token. The ViT's final norm, which
        follows its last block, has no counterpart here (ours follows the decoder) and is left out. A checkpoint
        in this model's own names is returned as it is."""
        if not any(k.startswith(("blocks.", "embedding/", "conv_proj.")) for k in sd):
            return sd
        if "embedding/kernel" in sd:
            sd = vit_from_npz(sd)
        elif "conv_proj.weight" in sd:
            sd = vit_from_torchvision(sd)
        out = {}
        for k, v in sd.items():
            if k.startswith("blocks.") and int(k.split(".")[1]) < len(self.encoder.blocks):
                out["encoder." + k] = v
            elif k.startswith("patch_embed."):
                out["encoder." + k] = v
            elif k == "cls_token":
                out[k] = v
        if "pos_embed" in sd:
            pe = sd["pos_embed"]
            if math.isqrt(pe.shape[1] - 1) ** 2 == pe.shape[1] - 1:
                pe = pe[:, 1:]
            out["encoder.pos_embed"] = resample_pos_embed(pe, self.encoder.num_patches, 0)
        return out

    def forward_head(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, C): the class token after the TABs and the final norm."""
        return self.norm(self.decoder(self.cls_token, patches))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
