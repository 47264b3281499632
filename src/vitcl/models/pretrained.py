"""Pretrained backbone weights from a local file: timm or torchvision state dicts, and the original ViT release's
`.npz` (JAX/Flax names). Nothing is downloaded; a missing file is an error that says where to get it.

The file's names are converted to ours (which are timm's), shapes that depend on the input size are resampled
(ViT position embeddings, Swin relative-position tables), classifier heads are dropped, and the rest must match by
name and shape. What did not load is reported in one line on stderr.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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


# --------------------------------------------------------------------------------------------- ViT
def vit_from_npz(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original (big_vision / vit_jax) names and layouts -> timm's."""
    out = {"patch_embed.proj.weight": w["embedding/kernel"].permute(3, 2, 0, 1),
           "patch_embed.proj.bias": w["embedding/bias"],
           "cls_token": w["cls"], "pos_embed": w["Transformer/posembed_input/pos_embedding"],
           "norm.weight": w["Transformer/encoder_norm/scale"], "norm.bias": w["Transformer/encoder_norm/bias"]}
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        p, q = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = p + "MultiHeadDotProductAttention_1/"
        out[q + "norm1.weight"], out[q + "norm1.bias"] = w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"]
        out[q + "norm2.weight"], out[q + "norm2.bias"] = w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"]
        out[q + "attn.qkv.weight"] = torch.cat([w[att + f"{n}/kernel"].flatten(1).T for n in ("query", "key", "value")])
        out[q + "attn.qkv.bias"] = torch.cat([w[att + f"{n}/bias"].flatten() for n in ("query", "key", "value")])
        out[q + "attn.proj.weight"] = w[att + "out/kernel"].flatten(0, 1).T
        out[q + "attn.proj.bias"] = w[att + "out/bias"]
        for j, name in ((0, "fc1"), (1, "fc2")):
            out[q + f"mlp.{name}.weight"] = w[p + f"MlpBlock_3/Dense_{j}/kernel"].T
            out[q + f"mlp.{name}.bias"] = w[p + f"MlpBlock_3/Dense_{j}/bias"]
        i += 1
    return out


def vit_from_torchvision(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"patch_embed.proj.weight": w["conv_proj.weight"], "patch_embed.proj.bias": w["conv_proj.bias"],
           "cls_token": w["class_token"], "pos_embed": w["encoder.pos_embedding"],
           "norm.weight": w["encoder.ln.weight"], "norm.bias": w["encoder.ln.bias"]}
    i = 0
    while f"encoder.layers.encoder_layer_{i}.ln_1.weight" in w:
        p, q = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        pairs = {"ln_1": "norm1", "ln_2": "norm2", "self_attention.out_proj": "attn.proj"}
        mlp = ("mlp.0", "mlp.3") if p + "mlp.0.weight" in w else ("mlp.linear_1", "mlp.linear_2")
        pairs.update({mlp[0]: "mlp.fc1", mlp[1]: "mlp.fc2"})
        for a, b in pairs.items():
            out[q + b + ".weight"], out[q + b + ".bias"] = w[p + a + ".weight"], w[p + a + ".bias"]
        out[q + "attn.qkv.weight"] = w[p + "self_attention.in_proj_weight"]
        out[q + "attn.qkv.bias"] = w[p + "self_attention.in_proj_bias"]
        i += 1
    return out


def resample_pos_embed(pe: torch.Tensor, n_tokens: int, n_prefix: int) -> torch.Tensor:
    """(1, n_prefix + g*g, D) -> (1, n_tokens, D): the grid part resampled bicubically (timm's rule)."""
    if pe.shape[1] == n_tokens:
        return pe
    prefix, grid = pe[:, :n_prefix], pe[:, n_prefix:]
    if prefix.shape[1] < n_prefix:  # a checkpoint without class token position for a model with one
        prefix = torch.zeros(1, n_prefix, pe.shape[2], dtype=pe.dtype)
    old, new = int(math.isqrt(grid.shape[1])), int(math.isqrt(n_tokens - n_prefix))
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=new < old)
    return torch.cat([prefix.float(), grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1).to(pe.dtype)


def adapt_vit(model, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "embedding/kernel" in sd:
        sd = vit_from_npz(sd)
    elif "conv_proj.weight" in sd:
        sd = vit_from_torchvision(sd)
    if "pos_embed" in sd:
        n_prefix = 1 if model.cls_token is not None else 0
        pe = sd["pos_embed"]
        if n_prefix == 0 and math.isqrt(pe.shape[1] - 1) ** 2 == pe.shape[1] - 1:
            pe = pe[:, 1:]  # a class-token checkpoint into a mean-pooled model
        sd["pos_embed"] = resample_pos_embed(pe, model.pos_embed.shape[1], n_prefix)
    return sd


# --------------------------------------------------------------------------------------------- Swin
def swin_from_torchvision(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in w.items():
        parts = k.split(".")
        if parts[0] != "features":
            out[k] = v
            continue
        f = int(parts[1])
        rest = ".".join(parts[2:])
        if f == 0:
            out[{"0.weight": "patch_embed.proj.weight", "0.bias": "patch_embed.proj.bias",
                 "2.weight": "patch_embed.norm.weight", "2.bias": "patch_embed.norm.bias"}.get(rest, k)] = v
        elif f % 2 == 0:  # patch merging feeding stage f/2
            out[f"layers.{f // 2}.downsample.{rest}"] = v
        else:
            j, sub = parts[2], ".".join(parts[3:])
            sub = sub.replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            out[f"layers.{f // 2}.blocks.{j}.{sub}"] = v
    return out


def adapt_swin(model, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith("features.") for k in sd):
        sd = swin_from_torchvision(sd)
    elif any(k.startswith("layers.0.downsample.") for k in sd):  # the original layout: merging ends a stage
        moved = {}
        for k, v in sd.items():
            if k.startswith("layers.") and ".downsample." in k:
                i = int(k.split(".")[1])
                k = k.replace(f"layers.{i}.downsample.", f"layers.{i + 1}.downsample.", 1)
            moved[k] = v
        sd = moved
    sd = {k: v for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    own = model.state_dict()
    for k, v in list(sd.items()):
        if k.endswith("relative_position_bias_table") and k in own and own[k].shape != v.shape:
            old, new = int(math.isqrt(v.shape[0])), int(math.isqrt(own[k].shape[0]))
            t = v.T.reshape(1, -1, old, old).float()
            t = F.interpolate(t, size=(new, new), mode="bicubic", align_corners=False)
            sd[k] = t.reshape(-1, new * new).T.to(v.dtype)
    return sd


# --------------------------------------------------------------------------------------------- loading
def adapt(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from .resnet import ResNet
    from .swin import SwinTransformer
    from .vit import VisionTransformer

    if isinstance(model, VisionTransformer):
        sd = adapt_vit(model, sd)
    elif isinstance(model, SwinTransformer):
        sd = adapt_swin(model, sd)
    elif isinstance(model, ResNet):
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked") or k in model.state_dict()}
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
