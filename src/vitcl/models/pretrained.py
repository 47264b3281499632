"""Pretrained backbone weights from a local file: timm or torchvision state dicts, and the original ViT release's
`.npz` (JAX/Flax names). Nothing is downloaded; a missing file is an error that says where to get it.

Each family converts the file's names to ours (which are timm's) and resamples the shapes that depend on the input
size (ViT position embeddings, Swin relative-position tables) in its own `checkpoint_filter_fn` (vit.py, swin.py,
resnet.py); here classifier heads are dropped, and the rest must match by name and shape. What did not load is
reported in one line on stderr.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

# file name -> where the file comes from (shown when it is missing)
KNOWN_FILES = {
    "ViT-B_16.npz": "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz (ImageNet-21k, the "
                    "Mask-RKR code's default)",
    "resnet18-f37072fd.pth": "https://download.pytorch.org/models/resnet18-f37072fd.pth (torchvision)",
    "resnet18-5c106cde.pth": "https://download.pytorch.org/models/resnet18-5c106cde.pth (torchvision, older)",
    "swin_tiny_patch4_window7_224.pth": "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                                        "swin_tiny_patch4_window7_224.pth",
    "swin_base_patch4_window7_224.pth": "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                                        "swin_base_patch4_window7_224.pth",
    "swin_base_patch4_window7_224_22k.pth": "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                                            "swin_base_patch4_window7_224_22k.pth",
}
HEAD_KEYS = ("head.", "fc.", "heads.", "pre_logits.", "head_dist.")


def how_to_get(path: Path) -> str:
    where = KNOWN_FILES.get(path.name)
    if where:
        return f"download {where} to that path"
    return ("give the path of a timm or torchvision state dict (.pth, .pt, .bin, .safetensors) or of the original "
            "ViT release's .npz, or set it to null to start from random weights")


def read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: torch.from_numpy(np.asarray(data[k])) for k in data.files}
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"{path}: reading .safetensors needs the safetensors package") from None
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        raise ConfigError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items() if torch.is_tensor(v)}


# --------------------------------------------------------------------------------------------- loading
def adapt(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The family's own conversion (its `checkpoint_filter_fn`, beside the model as in timm), then no classifier:
    the backbones here have none. timm's modules take timm's names as they are."""
    filter_fn = getattr(model, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(sd)
    return {k: v for k, v in sd.items() if not k.startswith(HEAD_KEYS)}


def load_pretrained(model: nn.Module, path: str, key: str = "model.pretrained") -> dict:
    """Load `path` into `model` in place; returns {loaded, skipped, missing} name lists."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: {file} not found; {how_to_get(file)}")
    sd = adapt(model, read_file(file))
    own = model.state_dict()
    loaded = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in sd if k not in loaded)
    missing = sorted(k for k in own if k not in loaded)
    if not loaded:
        raise ConfigError(f"{key}: no tensor of {file} matches the model's names and shapes "
                          f"(first names in the file: {', '.join(list(sd)[:3])})")
    model.load_state_dict(loaded, strict=False)
    if skipped or missing:
        def show(names):
            return ", ".join(names[:4]) + (f" (+{len(names) - 4})" if len(names) > 4 else "")

        print(f"pretrained {file.name}: loaded {len(loaded)} tensors; not in the model or of another shape: "
              f"{show(skipped) or '-'}; left at their initial values: {show(missing) or '-'}", file=sys.stderr)
    return {"loaded": sorted(loaded), "skipped": skipped, "missing": missing}
