"""LeViT (Graham et al. 2021, "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference") through
timm's `timm.models.levit.Levit` (the optional extra `pip install 'vitcl[timm]'`): a conv stem, then stages of
attention with a learned per-head bias over relative offsets and hard-swish MLPs, joined by attention downsampling,
mean-pooled. The defaults are LeViT-128S (dims 128/256/384, depths 2/3/4, heads 4/6/8, key dim 16).

What timm lacks is a stem for small images: LeViT's stem has stride 16, which leaves 2x2 tokens of a 32 px image.
`stem_stride: 4` (the default) keeps the stem's shape, 3x3 stride-2 conv-BN layers each doubling the width up to the
first stage's, with only its last two convs, so a 32 px image enters the first stage as 8x8 tokens (a 224 px one
enters LeViT's as 14x14). `stem_stride: 16` or `8` is timm's own stem."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from .registry import register_model
from .timm_backbone import require_timm

STEM_STRIDES = (2, 4, 8, 16)


@dataclass
class LeViTOptions:
    name: str = "levit"
    embed_dim: list[int] = field(default_factory=lambda: [128, 256, 384])  # token width of each stage
    depth: list[int] = field(default_factory=lambda: [2, 3, 4])
    num_heads: list[int] = field(default_factory=lambda: [4, 6, 8])
    key_dim: int = 16  # width of a head's queries and keys; values are attn_ratio times wider
    attn_ratio: float = 2.0
    mlp_ratio: float = 2.0
    stem_stride: int = 4
    drop_path: float = 0.0

    def validate(self, key: str) -> None:
        n = len(self.embed_dim)
        for name in ("depth", "num_heads"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"{key}.{name}: one value per stage ({n} stages in {key}.embed_dim), "
                                  f"got {getattr(self, name)}")
        if min(self.depth + self.num_heads) < 1 or self.key_dim < 1:
            raise ConfigError(f"{key}.depth/num_heads/key_dim: expected >= 1")
        if any(d < self.key_dim for d in self.embed_dim[:-1]):
            # the downsampling attention after a stage has embed_dim // key_dim heads
            raise ConfigError(f"{key}.key_dim: {self.key_dim} is wider than a stage that downsamples "
                              f"({self.embed_dim[:-1]})")
        if self.stem_stride not in STEM_STRIDES:
            raise ConfigError(f"{key}.stem_stride: expected one of {', '.join(map(str, STEM_STRIDES))}, "
                              f"got {self.stem_stride}")
        if self.embed_dim[0] % self.stem_stride:
            raise ConfigError(f"{key}.embed_dim: the stem halves the first width per stride-2 conv, so "
                              f"{self.embed_dim[0]} must be a multiple of stem_stride {self.stem_stride}")


def small_stem(in_chans: int, dim: int, stride: int, conv_norm, act) -> nn.Sequential:
    """LeViT's stem cut to log2(stride) convs: widths dim/stride*2, ..., dim/2, dim, timm's layer names."""
    stem = nn.Sequential()
    n = stride.bit_length() - 1
    chans = in_chans
    for i in range(n):
        out = dim >> (n - 1 - i)
        stem.add_module(f"conv{i + 1}", conv_norm(chans, out, 3, stride=2, padding=1))
        if i < n - 1:
            stem.add_module(f"act{i + 1}", act())
        chans = out
    return stem


@register_model("levit")
class LeViT:
    """The registry entry: it builds timm's Levit (no instance of this class) without a classifier, so the model's
    forward gives the (B, num_features) mean of the last stage's tokens."""

    Options = LeViTOptions

    @classmethod
    def from_options(cls, opts: LeViTOptions, img_size: int, in_chans: int):
        require_timm("levit")
        from timm.layers import get_act_layer
        from timm.models.levit import ConvNorm, Levit

        if img_size % opts.stem_stride:
            raise ConfigError(f"model.stem_stride: {opts.stem_stride} does not divide the image size {img_size}")
        stem: dict = {"stem_type": f"s{opts.stem_stride}"}
        if opts.stem_stride < 8:
            stem = {"stem_backbone": small_stem(in_chans, opts.embed_dim[0], opts.stem_stride, ConvNorm,
                                                get_act_layer("hard_swish")),
                    "stem_stride": opts.stem_stride}
        return Levit(img_size=img_size, in_chans=in_chans, num_classes=0, embed_dim=tuple(opts.embed_dim),
                     key_dim=opts.key_dim, depth=tuple(opts.depth), num_heads=tuple(opts.num_heads),
                     attn_ratio=opts.attn_ratio, mlp_ratio=opts.mlp_ratio, drop_path_rate=opts.drop_path, **stem)
