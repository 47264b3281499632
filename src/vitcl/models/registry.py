"""The model registry: a name, its options dataclass, and a builder (options, img_size, in_chans) -> backbone."""
from __future__ import annotations

from ..registry import Registry

MODELS: Registry = Registry("model")


def register_model(name: str, options: type):
    def add(fn):
        fn.Options = options
        return MODELS.register(name)(fn)

    return add


def create_backbone(opts, img_size: int, in_chans: int):
    """A backbone exposes num_features, forward_features(x) and forward_head(features) -> (B, num_features).
    Options with a `pretrained` path get those weights loaded (models/pretrained.py)."""
    model = MODELS.get(opts.name, "model.name")(opts, img_size=img_size, in_chans=in_chans)
    path = getattr(opts, "pretrained", None)
    if path:
        from .pretrained import load_pretrained

        load_pretrained(model, path)
    return model
