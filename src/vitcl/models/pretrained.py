"""Pretrained backbone weights: a local file (timm or torchvision state dicts, the original ViT release's `.npz` with
JAX/Flax names), or `hf_hub:timm/<name>`, a timm checkpoint on the Hugging Face hub (model.safetensors, else
pytorch_model.bin) resolved through huggingface_hub's cache: downloaded when online, read from the cache when
HF_HUB_OFFLINE is set or the download fails, so that a cached file works offline. A local file that is missing is an
error that says where to get it.

Each family converts the file's names to ours (which are timm's) and resamples the shapes that depend on the input
size (ViT position embeddings, Swin relative-position tables) in its own `checkpoint_filter_fn` (vit.py, swin.py,
resnet.py); here classifier heads are dropped, and the rest must match by name and shape. What did not load is
reported in one line on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import os
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
HUB_PREFIX = "hf_hub:"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repos hold, in timm's order of preference


# --------------------------------------------------------------------------------------------- the hub
def hub_cache() -> Path:
    """huggingface_hub's cache folder, read from the environment at call time (the library reads it once at import):
    HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub(spec: str, key: str = "model.pretrained") -> Path:
    """`hf_hub:owner/name` -> the local path of its checkpoint file, downloading it into the cache when online."""
    repo_id = spec[len(HUB_PREFIX):].strip()
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"{key}: expected hf_hub:OWNER/NAME (e.g. hf_hub:timm/vit_base_patch16_224.augreg_in21k), "
                          f"got '{spec}'")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ConfigError(f"{key}: '{spec}' needs the optional huggingface_hub package: pip install 'vitcl[hub]' "
                          f"(or give the path of a downloaded checkpoint)") from None
    cache = hub_cache()
    errors: list[str] = []
    # online first (the hub may hold a newer revision), then the cache alone: a failed download (no network, a
    # firewall) still finds a file cached earlier
    for local_only in ((True,) if hub_offline() else (False, True)):
        for filename in HUB_FILES:
            try:
                return Path(str(hf_hub_download(repo_id, filename, cache_dir=cache, local_files_only=local_only)))
            except Exception as exc:  # noqa: BLE001 - the hub's errors differ between versions; all mean "not here"
                first = (str(exc).strip().splitlines() or [""])[0]
                errors.append(f"{filename}{' (cache)' if local_only else ''}: {type(exc).__name__}: {first[:120]}")
                if not local_only and type(exc).__name__ == "LocalEntryNotFoundError":
                    break  # the hub is unreachable (and the file not cached): no other file is tried online
    offline = " (HF_HUB_OFFLINE is set, so nothing was downloaded)" if hub_offline() else ""
    why = "; ".join(dict.fromkeys([errors[0], errors[-1]]))  # the download's failure and the cache's
    raise ConfigError(f"{key}: {repo_id} has neither {' nor '.join(HUB_FILES)} in the Hugging Face cache {cache} "
                      f"(HF_HOME={os.environ.get('HF_HOME', 'unset')}){offline}, and it could not be downloaded; "
                      f"download it once online, or set HF_HOME to a cache that holds it ({why})")


def how_to_get(path: Path) -> str:
    where = KNOWN_FILES.get(path.name)
    if where:
        return f"download {where} to that path"
    return ("give the path of a timm or torchvision state dict (.pth, .pt, .bin, .safetensors) or of the original "
            "ViT release's .npz, or set it to null to start from random weights")


def load_failure(exc: Exception) -> str:
    """One line on why torch.load failed: torch's weights-only message is a paragraph whose cause follows
    'WeightsUnpickler error:' (an unsupported opcode for a file that is no pickle, or the global it refused)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    for i, line in enumerate(lines):
        if marker in line:
            cause = line.split(marker, 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return f"weights-only load: {cause[:200]}"
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def namespace_allowed():
    """A weights-only load that accepts argparse.Namespace: DeiT's and DyTox's checkpoints keep their command line
    as one beside the weights. torch >= 2.5 allows it for the load (`safe_globals`); torch 2.4 only for the whole
    process (`add_safe_globals`), which is as harmless: a Namespace holds values, it runs nothing."""
    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):
        return serialization.safe_globals([argparse.Namespace])
    serialization.add_safe_globals([argparse.Namespace])
    return contextlib.nullcontext()


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
        with namespace_allowed():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        raise ConfigError(f"{path}: not a readable torch checkpoint ({load_failure(exc)})") from None
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
    elif type(model).__module__.startswith("timm."):
        # timm's model modules have theirs as a function of (state dict, model): position embeddings resampled to
        # the model's image size, older layouts converted
        timm_filter = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if timm_filter is not None:
            sd = timm_filter(sd, model)
    return {k: v for k, v in sd.items() if not k.startswith(HEAD_KEYS)}


def load_pretrained(model: nn.Module, path: str, key: str = "model.pretrained") -> dict:
    """Load `path` (a file, or `hf_hub:owner/name`) into `model` in place; returns {loaded, skipped, missing} name
    lists."""
    if path.startswith(HUB_PREFIX):
        file, label = resolve_hub(path, key), path
    else:
        file = Path(path).expanduser()
        label = file.name
        if not file.is_file():
            raise ConfigError(f"{key}: {file} not found; {how_to_get(file)}")
    sd = adapt(model, read_file(file))
    own = model.state_dict()
    loaded = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in sd if k not in loaded)
    missing = sorted(k for k in own if k not in loaded)
    if not loaded:
        raise ConfigError(f"{key}: no tensor of {label} matches the model's names and shapes "
                          f"(first names in the file: {', '.join(list(sd)[:3])})")
    model.load_state_dict(loaded, strict=False)
    if skipped or missing:
        def show(names):
            return ", ".join(names[:4]) + (f" (+{len(names) - 4})" if len(names) > 4 else "")

        print(f"pretrained {label}: loaded {len(loaded)} tensors; not in the model or of another shape: "
              f"{show(skipped) or '-'}; left at their initial values: {show(missing) or '-'}", file=sys.stderr)
    return {"loaded": sorted(loaded), "skipped": skipped, "missing": missing}
