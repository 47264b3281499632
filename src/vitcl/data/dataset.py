"""Image sets: uint8 tensors in memory, or a lazy reader that decodes files on demand (large datasets)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ImageSet:
    """Images (N, C, H, W) uint8 in memory, or `read(i)` -> (C, H, W) uint8 for lazy sets; targets (N,) int64."""

    targets: torch.Tensor
    images: torch.Tensor | None = None
    read: Callable[[int], torch.Tensor] | None = None
    class_names: list[str] = field(default_factory=list)
    image_size: int = 0
    channels: int = 0
    # what the source read (folder, files with size and md5, image count), for the run's data record; views and
    # fitted copies do not carry it, the builder takes it from the sets the source returned
    provenance: dict | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.images is None and self.read is None:
            raise ValueError("an ImageSet needs images or a read function")
        if self.images is not None:
            if self.images.dtype != torch.uint8 or self.images.ndim != 4:
                shape = tuple(self.images.shape)
                raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {shape}")
            if len(self.images) != len(self.targets):
                raise ValueError(f"{len(self.images)} images but {len(self.targets)} targets")
            self.channels, self.image_size = self.images.shape[1], self.images.shape[-1]
        self.targets = self.targets.long()

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(self.targets.max()) + 1

    def subset(self, keep: torch.Tensor) -> ImageSet:
        """Rows `keep` of this set (in memory), or a lazy view of them."""
        keep = keep.long()
        if self.images is not None:
            return ImageSet(self.targets[keep], self.images[keep], None, self.class_names)
        assert self.read is not None  # __post_init__: a set has images or a read function
        return ImageSet(self.targets[keep], None, RowReader(self.read, keep), self.class_names, self.image_size,
                        self.channels)


class RowReader:
    """`read` restricted to some rows: row i of the view is row rows[i] of the base. A class rather than a closure,
    so lazy sets pickle into DataLoader workers under any start method; the rows are one numpy array (no Python
    objects per row to copy or refcount)."""

    def __init__(self, read: Callable[[int], torch.Tensor], rows: torch.Tensor):
        self.read, self.rows = read, rows.numpy().astype(np.int64)

    def __call__(self, i: int) -> torch.Tensor:
        return self.read(int(self.rows[i]))


class ConcatReader:
    """Reads row i of the concatenation of several sets (lazy or in memory)."""

    def __init__(self, sets: list[ImageSet]):
        self.parts: list[torch.Tensor | Callable[[int], torch.Tensor]] = []
        for s in sets:
            part = s.images if s.images is not None else s.read
            assert part is not None  # __post_init__: a set has images or a read function
            self.parts.append(part)
        self.bounds = torch.tensor([0] + [len(s) for s in sets]).cumsum(0)

    def __call__(self, i: int) -> torch.Tensor:
        k = int(torch.searchsorted(self.bounds, torch.tensor(i), right=True)) - 1
        part = self.parts[k]
        j = i - int(self.bounds[k])
        return part[j] if isinstance(part, torch.Tensor) else part(j)


def fit_images(images: torch.Tensor, size: int, channels: int, mode: str = "resize") -> torch.Tensor:
    """Bring uint8 images to (channels, size, size): grey <-> RGB, then zero-pad (centred) or resize."""
    if images.shape[1] != channels:
        if channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif channels == 1 and images.shape[1] == 3:
            luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            raise ValueError(f"cannot convert {images.shape[1]} channels to {channels}")
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images.contiguous()
    if mode == "pad" and h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(images, (left, size - w - left, top, size - h - top)).contiguous()
    out = []
    for chunk in images.split(4096):  # bounded memory for large sets
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def per_class_head(targets: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first n samples of every class, in dataset order (a deterministic subset)."""
    order = torch.argsort(targets, stable=True)
    sorted_t = targets[order]
    starts = torch.searchsorted(sorted_t, sorted_t, right=False)
    rank = torch.arange(len(targets)) - starts
    return order[rank < n].sort().values
