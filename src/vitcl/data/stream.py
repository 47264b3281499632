"""Batches of uint8 images on the device. In-memory sets are indexed directly (no workers, no per-image
transforms); lazy sets decode in DataLoader workers. Augmentation happens afterwards, batched, on the device.

Each epoch's order comes from a generator seeded by (seed, task, phase, epoch), identical on every rank; rank r
takes its share of every global batch, so 1 and N processes see the same global batches.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import VitclError
from .dataset import ImageSet, fit_images


def epoch_order(n: int, seed: int, shuffle: bool, repeats: int = 1, repeat_mode: str = "extend") -> torch.Tensor:
    """Positions 0..n-1 for one epoch, a fresh permutation every epoch. With repeats > 1 (repeated augmentation):
    - "extend": each position appears `repeats` times, spread over an epoch `repeats` times longer;
    - "deit": DeiT's RASampler: the epoch keeps n samples, the first ceil(n / repeats) positions of the permutation
      each repeated `repeats` times in a row (so the copies share a global batch): about n / repeats images."""
    g = torch.Generator().manual_seed(seed)
    if repeats > 1 and repeat_mode == "deit":
        perm = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        return perm[: -(-n // repeats)].repeat_interleave(repeats)[:n]
    if repeat_mode not in ("extend", "deit"):
        raise ValueError(f"unknown repeat mode {repeat_mode!r}")
    base = torch.arange(n).repeat_interleave(repeats) if repeats > 1 else torch.arange(n)
    return base[torch.randperm(len(base), generator=g)] if shuffle else base


def global_batches(order: torch.Tensor, batch_size: int, drop_last: bool) -> list[torch.Tensor]:
    batches = list(order.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def rank_share(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Contiguous share of a global batch (the last rank's may be shorter; it may be empty)."""
    per = -(-len(batch) // world)
    return batch[rank * per: (rank + 1) * per]


class _Lazy(Dataset):
    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images.read(i)
        return fit_images(img[None], self.images.image_size, self.images.channels)[0]


class BatchStream:
    """Yields (uint8 images on device, dataset indices) for given index batches of an ImageSet."""

    def __init__(self, images: ImageSet, device: torch.device, num_workers: int = 2):
        self.images, self.device, self.num_workers = images, device, num_workers
        self._on_device: torch.Tensor | None = None

    def _resident(self) -> torch.Tensor:
        # small sets live on the device once; larger ones are copied per batch from pinned host memory
        if self._on_device is None:
            images = self.images.images
            assert images is not None  # called for in-memory sets only
            on_gpu = self.device.type == "cuda" and images.numel() < 2 * 1024**3
            self._on_device = images.to(self.device) if on_gpu else images
        return self._on_device

    def __call__(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.images.in_memory:
            data = self._resident()
            for idx in batches:
                yield data[idx.to(data.device)].to(self.device, non_blocking=True), idx
            return
        loader = DataLoader(_Lazy(self.images), batch_sampler=[b.tolist() for b in batches],
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False)
        try:
            for idx, x in zip(batches, loader):
                yield x.to(self.device, non_blocking=True), idx
        except VitclError as exc:
            raise unwrap_worker_error(exc) from None


def unwrap_worker_error(exc: VitclError) -> VitclError:
    """The user error a DataLoader worker raised, with its own one-line message.

    torch re-raises a worker's exception in the main process as `type(exc)(msg)`, where msg is "Caught DataError in
    DataLoader worker process 0.\nOriginal Traceback ...": the original message is the last line of that traceback,
    after the exception's qualified name."""
    text = str(exc)
    if "\n" not in text:
        return exc
    cls = type(exc)
    prefix = f"{cls.__module__}.{cls.__qualname__}: "
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return cls(lines[-1][len(prefix):]) if lines else exc
