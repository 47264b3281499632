"""The model registry: a name -> a backbone class that declares its options dataclass (`Options`) and builds
itself from it (`from_options(opts, img_size, in_chans)`)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from ..registry import Registry
from .pretrained import load_pretrained

MODELS: Registry = Registry("model")


def register_model(name: str):
    """Register a class under `name`. It must carry `Options` (config validates the `model:` section against
    that dataclass) and `from_options`."""

    def add(cls):
        missing = [a for a in ("Options", "from_options") if not hasattr(cls, a)]
        if missing:
            raise TypeError(f"model '{name}': {cls.__name__} lacks {', '.join(missing)}")
        return MODELS.register(name)(cls)

    return add


class Backbone(nn.Module):
    """A backbone whose options dataclass is the one list of its parameters and defaults: the constructor takes
    (img_size, in_chans, opts) and reads the fields; keywords change single fields, as dataclasses.replace does
    (`ConViT(32, 3, sab="mhsa")`). A backbone exposes num_features, forward_features(x) and
    forward_head(features) -> (B, num_features); `checkpoint_filter_fn(state_dict)`, where a family has one,
    converts other releases' names and shapes to its own (models/pretrained.py)."""

    Options: ClassVar[type]

    @classmethod
    def options(cls, opts=None, **changes):
        return dataclasses.replace(cls.Options() if opts is None else opts, **changes)

    @classmethod
    def from_options(cls, opts, img_size: int, in_chans: int):
        return cls(img_size, in_chans, opts)


def create_backbone(opts, img_size: int, in_chans: int):
    """The backbone `opts.name` built from `opts`; options with a `pretrained` path get those weights loaded."""
    model = MODELS.get(opts.name, "model.name").from_options(opts, img_size, in_chans)
    path = getattr(opts, "pretrained", None)
    if path:
        load_pretrained(model, path)
    return model
