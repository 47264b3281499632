"""timm's backbones (`model.name: timm`, `model.arch: vit_base_patch16_224`, ...), through the optional extra
`pip install 'vitcl[timm]'`. The package never needs timm: our own ViT and Swin carry timm's state-dict names, so
timm checkpoints load into them. timm's ViT and Swin name their layers as ours do, so the surgery's default
layers apply to them unchanged."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .registry import register_model


@dataclass
class TimmOptions:
    name: str = "timm"
    arch: str = "vit_base_patch16_224"
    drop_path: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # more keyword arguments of timm.create_model
    pretrained: str | None = None  # a local state dict in timm's names, or hf_hub:timm/<name> (models/pretrained.py)


def require_timm(model: str):
    """The timm package, or the one-line error that says how to get it (an absent or broken torchvision, which timm
    imports, fails here too)."""
    try:
        import timm
    except (ImportError, OSError, RuntimeError) as exc:
        why = (str(exc).splitlines() or [""])[0]
        raise ConfigError(f"model.name: '{model}' needs the optional timm package, which did not import "
                          f"({type(exc).__name__}: {why}): pip install 'vitcl[timm]'") from None
    return timm


def timm_family(arch: str) -> str:
    """Which of our backbones' layer names a timm architecture shares (for the surgery's default layers)."""
    if arch.startswith("swin"):
        return "swin"
    if arch.startswith(("vit", "deit")):
        return "vit"
    return "timm"


@register_model("timm")
class TimmBackbone:
    """The registry entry for timm's models: what it builds is timm's own module (no instance of this class), whose
    names are already timm's, so it needs no checkpoint filter."""

    Options = TimmOptions

    @classmethod
    def from_options(cls, opts: TimmOptions, img_size: int, in_chans: int):
        timm = require_timm("timm")
        kwargs = dict(opts.kwargs)
        if timm_family(opts.arch) in ("vit", "swin"):
            kwargs.setdefault("img_size", img_size)
        try:
            return timm.create_model(opts.arch, pretrained=False, num_classes=0, in_chans=in_chans,
                                     drop_path_rate=opts.drop_path, **kwargs)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ConfigError(f"model.arch: timm cannot build '{opts.arch}' ({exc})") from None
