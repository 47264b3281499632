"""Batched augmentation on the device: uint8 batch in, normalised float batch out.

The order is timm's: crop, flip, RandAugment, then to float and normalise. timm's random-resized crop is per image,
before batching (data/crops.py, applied by data/stream.py); the pad+crop here and flips are tensor indexing
(one gather per batch) on the uint8 images; RandAugment is timm's per-image policy on uint8 (data/randaugment.py) or,
as the alternative, kornia's batch-level one on floats in [0, 1].
Randomness comes from torch's global generators, which the engine reseeds every epoch (exact resume): the crops'
and flips' from the device's, timm's RandAugment's from the host's (its choice of operation per image decides
which kernels run, so it is drawn where it is read without waiting for the device).
MixUp/CutMix follow timm's batch mode (each sample mixed with the flipped batch, one lambda per batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import AugmentConfig
from ..errors import ConfigError
from .randaugment import TimmRandAugment, parse_policy
from .transfer import to_device


class BatchAugment:
    def __init__(self, cfg: AugmentConfig, mean: tuple[float, ...], std: tuple[float, ...], channels: int):
        self.cfg = cfg
        mean = tuple(cfg.mean or mean)
        std = tuple(cfg.std or std)
        if len(mean) == 1 and channels > 1:
            mean, std = mean * channels, std * channels
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"normalisation has {len(mean)} values for {channels} channels")
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self._stats_on = (self.mean.device, self.mean, self.std)
        self.randaugment = None
        self.timm_randaugment = None
        if cfg.randaugment is not None:
            fill = tuple(cfg.randaugment_fill or (min(255, round(255 * v)) for v in mean))  # timm's img_mean
            if len(fill) not in (1, channels) or not all(0 <= v <= 255 for v in fill):
                raise ConfigError(f"data.augment.randaugment_fill: expected 1 or {channels} values in 0..255, "
                                  f"got {list(fill)}")
            self.timm_randaugment = TimmRandAugment(parse_policy(cfg.randaugment), fill,
                                                    cfg.randaugment_interpolation)
        elif cfg.randaugment_n > 0:
            from kornia.augmentation.auto import RandAugment

            self.randaugment = RandAugment(n=cfg.randaugment_n, m=cfg.randaugment_m)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self._stats_on[0] != x.device:  # copied once per device, not at every batch
            self._stats_on = (x.device, to_device(self.mean, x.device), to_device(self.std, x.device))
        _, mean, std = self._stats_on
        return (x - mean) / std

    def test(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(images.float().div_(255))

    def train(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images
        if self.cfg.crop == "pad" and self.cfg.crop_padding:
            x = random_crop(x, self.cfg.crop_padding, generator)
        if self.cfg.hflip:
            x = random_hflip(x, generator)
        if self.timm_randaugment is not None:
            x = self.timm_randaugment(x, generator)
        x = x.float().div_(255)
        if self.randaugment is not None:
            x = self.randaugment(x).clamp_(0, 1)
        return self.normalize(x)

    @property
    def mixes(self) -> bool:
        return self.cfg.mixup_alpha > 0 or self.cfg.cutmix_alpha > 0


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by `pad` and crop back at a random offset per image, by one gather."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (B,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(H, device=x.device)[None])  # (B, H)
    cols = (dx[:, None] + torch.arange(W, device=x.device)[None])  # (B, W)
    b = torch.arange(B, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """timm's targets: off = smoothing / C everywhere, on = 1 - smoothing + off."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def mix_batch(x: torch.Tensor, labels: torch.Tensor, num_classes: int,
              cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MixUp or CutMix (chosen with p=0.5 when both are on) with the flipped batch; returns x, soft targets, lambda."""
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or torch.rand(()).item() < 0.5)
    alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    x = x.clone()
    if use_cutmix:
        H, W = x.shape[-2:]
        ratio = (1 - lam) ** 0.5
        ch, cw = int(H * ratio), int(W * ratio)
        cy = int(torch.randint(0, H, ()))
        cx = int(torch.randint(0, W, ()))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually pasted
    else:
        x = x * lam + x.flip(0) * (1 - lam)
    t = smooth_one_hot(labels, num_classes, cfg.label_smoothing)
    return x, t * lam + t.flip(0) * (1 - lam), lam
