"""CoaT (Xu et al. 2021, "Co-Scale Conv-Attentional Image Transformers") through timm's `timm.models.coat.CoaT` (the
optional extra `pip install 'vitcl[timm]'`): four scales of serial blocks whose factorized attention carries a
convolutional relative position encoding, then (CoaT, not CoaT-Lite) parallel blocks that mix the last three scales;
the class tokens of those scales are aggregated (CoaT) or the last scale's is taken (CoaT-Lite). The defaults are
CoaT-Tiny (width 152 at every scale, 2 serial blocks each, 6 parallel blocks, 8 heads, MLP ratio 4).

timm's model takes any image size: for 32 px `patch_size: 2` (the default here; the paper's 224 px models use 4) gives
16x16, 8x8, 4x4 and 2x2 tokens at the four scales, so no scale collapses to one token. timm sizes its later scales'
patch embeddings as if the first patch were 4, so this file resizes them (timm's own `set_input_size`); the rest is
a mapping of our options onto timm's constructor."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import ConfigError
from .registry import register_model
from .timm_backbone import require_timm

T = TypeVar("T")
HEADS = 8  # timm's default relative-position windows split the heads 2 + 3 + 3 over 3x3, 5x5 and 7x7 kernels


@dataclass
class CoaTOptions:
    name: str = "coat"
    patch_size: int = 2  # of the first scale; each later scale halves the grid again
    embed_dims: list[int] = field(default_factory=lambda: [152, 152, 152, 152])
    serial_depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    parallel_depth: int = 6  # 0: CoaT-Lite
    num_heads: int = HEADS
    mlp_ratios: list[float] = field(default_factory=lambda: [4.0, 4.0, 4.0, 4.0])
    qkv_bias: bool = True
    attn_drop: float = 0.0
    drop_path: float = 0.0

    def validate(self, key: str) -> None:
        for name in ("embed_dims", "serial_depths", "mlp_ratios"):
            if len(getattr(self, name)) != 4:
                raise ConfigError(f"{key}.{name}: one value per scale (4), got {getattr(self, name)}")
        if self.num_heads != HEADS:
            raise ConfigError(f"{key}.num_heads: CoaT's relative position encoding splits exactly {HEADS} heads "
                              f"over its windows, got {self.num_heads}")
        if any(d % self.num_heads for d in self.embed_dims):
            raise ConfigError(f"{key}.embed_dims: each must be a multiple of num_heads {self.num_heads}, "
                              f"got {self.embed_dims}")
        if self.parallel_depth and len(set(self.embed_dims[1:])) != 1:
            raise ConfigError(f"{key}.embed_dims: the parallel blocks need the last three scales equally wide, "
                              f"got {self.embed_dims} (parallel_depth: 0 is CoaT-Lite)")
        if min(self.serial_depths) < 1 or self.parallel_depth < 0 or self.patch_size < 1:
            raise ConfigError(f"{key}.serial_depths/parallel_depth/patch_size: expected >= 1, >= 0, >= 1")


def four(values: list[T]) -> tuple[T, T, T, T]:
    """One value per scale, as the 4-tuple timm's signature names."""
    a, b, c, d = values
    return a, b, c, d


@register_model("coat")
class CoaT:
    """The registry entry: it builds timm's CoaT (no instance of this class) without a classifier, so the model's
    forward gives the (B, num_features) pooled class token."""

    Options = CoaTOptions

    @classmethod
    def from_options(cls, opts: CoaTOptions, img_size: int, in_chans: int):
        require_timm("coat")
        from timm.models.coat import CoaT as TimmCoaT

        if img_size % (opts.patch_size * 8):
            raise ConfigError(f"model.patch_size: the image size {img_size} must be a multiple of "
                              f"8 x patch_size ({opts.patch_size * 8}): three more scales each halve the grid")
        model = TimmCoaT(img_size=img_size, patch_size=opts.patch_size, in_chans=in_chans, num_classes=0,
                        embed_dims=four(opts.embed_dims), serial_depths=four(opts.serial_depths),
                        parallel_depth=opts.parallel_depth, num_heads=opts.num_heads,
                        mlp_ratios=four(opts.mlp_ratios), qkv_bias=opts.qkv_bias, attn_drop_rate=opts.attn_drop,
                        drop_path_rate=opts.drop_path)
        # timm sizes the later scales' patch embeddings for a first patch of 4 (img_size // 4, // 8, // 16)
        side = img_size // opts.patch_size
        for i in (2, 3, 4):
            getattr(model, f"patch_embed{i}").set_input_size(img_size=side)
            side //= 2
        return model
