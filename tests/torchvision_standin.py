"""A minimal torchvision stand-in, for tests only, so that timm (installed with `pip install --no-deps timm`) can be
imported where the real torchvision is absent or broken (PyPI's torchvision is a CUDA build that fails to import next
to CPU torch). It holds exactly the names that `import timm` (1.0.31) reads at import time: timm's data transforms
subclass `transforms.ToTensor`, its norm layers import `ops.misc.FrozenBatchNorm2d`, and its dataset factory imports
six dataset classes, and its transforms name `transforms.functional.InterpolationMode`. What timm imports from
torchvision inside try/except (the feature extraction helpers, the rarer datasets) is left out on purpose, so timm
takes its own fallbacks. Nothing here works:
calling a stand-in raises, so a test that strays into torchvision's functionality fails loudly."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from enum import Enum

import torch

NAME = "torchvision"
DATASETS = ("CIFAR10", "CIFAR100", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder")


def _unavailable(qualname: str) -> type:
    def init(self, *args, **kwargs):
        raise RuntimeError(f"{qualname} is part of the tests' torchvision stand-in: it does nothing")

    return type(qualname.rsplit(".", 1)[-1], (), {"__init__": init, "__module__": qualname.rsplit(".", 1)[0]})


class FrozenBatchNorm2d(torch.nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d's buffers and forward: batch norm with fixed statistics and affine."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class InterpolationMode(Enum):
    """torchvision.transforms.functional.InterpolationMode's members (timm keys dictionaries by them)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def real_torchvision_works() -> bool:
    try:
        importlib.import_module(NAME)
    except Exception:  # absent, or a build that fails to import (CUDA wheel next to CPU torch): anything counts
        for name in [n for n in sys.modules if n == NAME or n.startswith(NAME + ".")]:
            del sys.modules[name]  # a half-imported torchvision must not stay behind
        return False
    return True


def modules() -> dict[str, types.ModuleType]:
    """The stand-in's modules by their dotted names, each child also an attribute of its parent."""
    made: dict[str, types.ModuleType] = {}
    for name in ("", ".ops", ".ops.misc", ".transforms", ".transforms.functional", ".datasets"):
        full = NAME + name
        mod = types.ModuleType(full, "tests/torchvision_standin.py: not torchvision")
        mod.__path__ = []  # a package, so that its children import
        made[full] = mod
        if name:
            parent, _, child = full.rpartition(".")
            setattr(made[parent], child, mod)
    made["torchvision"].__version__ = "0.0+standin"  # type: ignore[attr-defined]
    made["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d  # type: ignore[attr-defined]
    made["torchvision.transforms"].ToTensor = _unavailable("torchvision.transforms.ToTensor")  # type: ignore[attr-defined]
    made["torchvision.transforms.functional"].InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    for cls in DATASETS:
        setattr(made["torchvision.datasets"], cls, _unavailable(f"torchvision.datasets.{cls}"))
    return made


def install() -> bool:
    """Put the stand-in into sys.modules unless a working torchvision is there; True when it was installed."""
    if NAME in sys.modules and getattr(sys.modules[NAME], "__version__", "") == "0.0+standin":
        return True
    if real_torchvision_works():
        return False
    sys.modules.update(modules())
    return True


def timm_importable() -> str | None:
    """None when timm imports (with the stand-in where needed), else why not: the reason a test skips with."""
    if importlib.util.find_spec("timm") is None:
        return "timm is not installed: pip install --no-deps timm==1.0.31 (see .ci/run)"
    install()
    try:
        importlib.import_module("timm")
    except Exception as exc:  # a timm that needs more of torchvision than the stand-in has
        return f"timm does not import even with the torchvision stand-in: {type(exc).__name__}: {exc}"
    return None
