"""A minimal torchvision stand-in, for tests only, so that timm (installed with `pip install --no-deps timm`) can be
imported where the real torchvision is absent or broken (PyPI's torchvision is a CUDA build that fails to import next
to CPU torch). It holds exactly the names that `import timm` (1.0.31) reads at import time: its data transforms
subclass `transforms.ToTensor` and key tables by `transforms.functional.InterpolationMode`, its norm layers import
`ops.misc.FrozenBatchNorm2d`, its dataset factory imports six dataset classes. What timm imports from torchvision
inside try/except (the feature extraction helpers, the rarer datasets) is left out, so timm takes its own fallbacks.
FrozenBatchNorm2d works (timm may build it); the transform and dataset classes raise when built, so a test that
strays into torchvision's functionality fails loudly. The stand-in is in sys.modules only while timm imports."""
from __future__ import annotations

import importlib
import importlib.machinery
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
        mod.__spec__ = importlib.machinery.ModuleSpec(full, None, is_package=True)
        mod.__path__ = []  # a package, so that its children import
        made[full] = mod
        if name:
            parent, _, child = full.rpartition(".")
            setattr(made[parent], child, mod)
    made["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d  # type: ignore[attr-defined]
    made["torchvision.transforms"].ToTensor = _unavailable("torchvision.transforms.ToTensor")  # type: ignore[attr-defined]
    made["torchvision.transforms.functional"].InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    for cls in DATASETS:
        setattr(made["torchvision.datasets"], cls, _unavailable(f"torchvision.datasets.{cls}"))
    return made


def timm_importable() -> str | None:
    """Import timm, with the stand-in in sys.modules only while it imports when no working torchvision is there:
    timm keeps the names it took, and later code that looks for torchvision (tests/timm_transforms.py) finds none.
    None when timm imports, else why not: the reason a test skips with."""
    if "timm" in sys.modules:
        return None
    if importlib.util.find_spec("timm") is None:
        return "timm is not installed: pip install --no-deps timm==1.0.31 (see .ci/run)"
    standin = {} if real_torchvision_works() else modules()
    sys.modules.update(standin)
    try:
        importlib.import_module("timm")
    except Exception as exc:  # a timm that needs more of torchvision than the stand-in has
        for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
            del sys.modules[name]
        return f"timm does not import even with the torchvision stand-in: {type(exc).__name__}: {exc}"
    finally:
        for name in standin:
            del sys.modules[name]
    return None
