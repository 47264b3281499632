"""Per-image crops for images of any size: timm's RandomResizedCrop for training and the resize + centre crop of its
ImageNet evaluation transform (docs/methods/dytox.md#imagenet-crops).

They run on one decoded uint8 (C, H, W) image, in the DataLoader workers of lazily read sets (data/stream.py), or
image by image on the device for in-memory batches: the same functions, so both paths give the same geometry.
Everything after the crop (flip, RandAugment, normalisation) stays batched (data/augment.py).

The random draws of one image come from `random.Random(key)`, with a key the engine derives from the epoch's seed
and the image's position in the epoch (never a worker's global generator), so that any number of workers, and a
resumed run, crop alike. `random.Random` is the generator timm draws from (Python's `random` module), so that with
the same seed the boxes are timm's.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import DataConfig
from .dataset import ImageSet, fit_images


@dataclass(frozen=True)
class CropSpec:
    """What the stream does to each image before batching. train: "resize" (to size x size, as fit_images; any
    pad-crop follows on the device) or "random-resized". test_crop_pct: None resizes to size x size, else the short
    side goes to floor(size / test_crop_pct) and the centre size x size is kept."""

    size: int
    channels: int
    train: str = "resize"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    test_crop_pct: float | None = None
    test_interpolation: str = "bicubic"

    @property
    def crops_train(self) -> bool:
        return self.train == "random-resized"

    @property
    def crops_test(self) -> bool:
        return self.test_crop_pct is not None


def random_resized_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop, as timm 0.4.12's RandomResizedCropAndInterpolation.get_params
    draws it: up to 10 tries of an area fraction uniform in `scale` and a log-uniform aspect ratio in `ratio`;
    when none fits, the largest centred box whose aspect ratio lies in `ratio`. A box of zero side (images of under
    5 pixels) is not accepted, as torchvision's get_params."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.randint(0, height - h)
            j = rng.randint(0, width - w)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) with the short side at `short` and the long side truncated, as torchvision's Resize(int)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def centre_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop: half the margin, rounded half to even (Python's round)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize_u8(image: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    """Resize a uint8 (C, H, W) image as Pillow does: antialiased (the kernel widened by the reduction factor;
    Pillow's bicubic has a = -0.5, as torch's antialiased one), one axis at a time with the result rounded to uint8
    in between. Width first, as Pillow mostly does, except where the height shrinks by the larger factor, where
    Pillow 13 mostly takes the height first. Where the order matches, the result is Pillow's up to its fixed-point
    coefficients (almost every pixel equal, none off by more than 1); where it does not, the intermediate rounding
    differs (a mean of about 0.25 levels, a few levels at most). tests/test_crops.py compares them."""
    h0, w0 = image.shape[-2:]
    if (h0, w0) == (height, width):
        return image
    x = image[None].float()
    order = ("h", "w") if height < h0 and height * w0 < width * h0 else ("w", "h")
    for axis in order:
        target = (x.shape[-2], width) if axis == "w" else (height, x.shape[-1])
        if tuple(x.shape[-2:]) != target:
            x = F.interpolate(x, size=target, mode=interpolation, align_corners=False, antialias=True)
            x = x.round_().clamp_(0, 255)
    return x[0].to(torch.uint8)


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """(C, H, W) uint8 with C = channels: grey repeated to RGB, RGB to luma, as fit_images."""
    c = image.shape[0]
    if c == channels:
        return image
    if channels == 3 and c == 1:
        return image.expand(3, -1, -1)
    if channels == 1 and c == 3:
        luma = torch.tensor([0.299, 0.587, 0.114], device=image.device).view(3, 1, 1)
        return (image.float() * luma).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def random_resized_crop(image: torch.Tensor, spec: CropSpec, key: int) -> torch.Tensor:
    """timm's training crop of one uint8 (C, H, W) image: the box drawn from `key`, resized to size x size."""
    h0, w0 = image.shape[-2:]
    i, j, h, w = random_resized_box(int(w0), int(h0), spec.scale, spec.ratio, random.Random(key))
    return resize_u8(image[:, i:i + h, j:j + w], spec.size, spec.size, spec.interpolation)


def centre_crop(image: torch.Tensor, spec: CropSpec) -> torch.Tensor:
    """timm's evaluation crop of one uint8 (C, H, W) image: short side to floor(size / crop_pct), centre crop."""
    assert spec.test_crop_pct is not None  # callers check crops_test
    h0, w0 = image.shape[-2:]
    h, w = short_side_size(int(h0), int(w0), int(math.floor(spec.size / spec.test_crop_pct)))
    x = resize_u8(image, h, w, spec.test_interpolation)
    top, left = centre_box(h, w, spec.size)
    return x[:, top:top + spec.size, left:left + spec.size].contiguous()


def crop_one(image: torch.Tensor, spec: CropSpec, train: bool, key: int | None) -> torch.Tensor:
    """One image to (channels, size, size) for a training (train, with its key) or an evaluation batch."""
    image = to_channels(image, spec.channels)
    if train and spec.crops_train:
        if key is None:
            raise ValueError("a random-resized crop needs the image's key")
        return random_resized_crop(image, spec, key)
    if not train and spec.crops_test:
        return centre_crop(image, spec)
    return fit_images(image[None], spec.size, spec.channels)[0]


def crop_batch(images: torch.Tensor, spec: CropSpec, train: bool, keys: torch.Tensor | None) -> torch.Tensor:
    """crop_one for every image of a uint8 (B, C, H, W) batch (in memory, on its device); a no-op where the spec
    does not crop this kind of batch (in-memory sets are already at size)."""
    if not ((train and spec.crops_train) or (not train and spec.crops_test)):
        return images
    if len(images) == 0:
        return images.new_zeros((0, spec.channels, spec.size, spec.size))
    if train:
        assert keys is not None  # BatchStream supplies them
        return torch.stack([crop_one(x, spec, True, int(k)) for x, k in zip(images, keys.tolist())])
    return torch.stack([crop_one(x, spec, False, None) for x in images])


def crop_spec(cfg: DataConfig, images: ImageSet) -> CropSpec:
    """The crops a data config asks for, for a set brought to images.image_size and images.channels."""
    a = cfg.augment
    scale, ratio = a.random_resized_scale, a.random_resized_ratio
    return CropSpec(images.image_size, images.channels, "random-resized" if a.crop == "random-resized" else "resize",
                    (scale[0], scale[1]), (ratio[0], ratio[1]), a.crop_interpolation, cfg.test_crop_pct,
                    cfg.test_interpolation)
