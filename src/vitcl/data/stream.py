"""Batches of uint8 images on the device. In-memory sets are indexed directly (no workers); lazy sets decode in
DataLoader workers, which also crop or resize each image to the set's size (data/crops.py: images differ in size
there). In-memory sets of one size get the same per-image crops on the device. Augmentation happens afterwards,
batched, on the device.

Each epoch's order comes from a generator seeded by (seed, task, phase, epoch), identical on every rank; rank r
takes its share of every global batch, so 1 and N processes see the same global batches.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import VitclError
from .crops import CropSpec, crop_batch, crop_one
from .dataset import ImageSet
from .transfer import to_device


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
    """Item (i, key): image i decoded, then cropped or resized to the set's size (data/crops.py); key is the
    image's random-crop key (-1: none)."""

    def __init__(self, images: ImageSet, spec: CropSpec, train: bool):
        self.images, self.spec, self.train = images, spec, train

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        i, key = item
        return crop_one(self.images.read(i), self.spec, self.train, key if key >= 0 else None)


class BatchStream:
    """Yields (uint8 images on device, dataset indices) for given index batches of an ImageSet.

    `train` batches get the spec's training crop, the others its evaluation crop. The random-resized crop of a
    training batch draws each image's box from its key (`keys`, one int64 per row, >= 0): the engine derives them
    from the epoch's seed and the rows' positions in the epoch; without keys they are drawn here, in the main
    process, from torch's global generator (which the engine reseeds), never in a worker."""

    def __init__(self, images: ImageSet, device: torch.device, num_workers: int = 2, spec: CropSpec | None = None):
        self.images, self.device, self.num_workers = images, device, num_workers
        self.spec = spec or CropSpec(images.image_size, images.channels)
        self._on_device: torch.Tensor | None = None

    def _resident(self) -> torch.Tensor:
        # small sets live on the device once; larger ones are copied per batch from pinned host memory
        if self._on_device is None:
            images = self.images.images
            assert images is not None  # called for in-memory sets only
            on_gpu = self.device.type == "cuda" and images.numel() < 2 * 1024**3
            self._on_device = images.to(self.device) if on_gpu else images
        return self._on_device

    def _keys(self, batches: list[torch.Tensor], train: bool, keys: list[torch.Tensor] | None) -> list[torch.Tensor]:
        if not (train and self.spec.crops_train):
            return [torch.full((len(b),), -1, dtype=torch.long) for b in batches]
        if keys is None:
            return [torch.randint(0, 2**62, (len(b),), dtype=torch.long) for b in batches]
        if len(keys) != len(batches) or any(len(k) != len(b) for k, b in zip(keys, batches)):
            raise ValueError("one crop key per row of every batch")
        return [k.long().cpu() for k in keys]

    def __call__(self, batches: list[torch.Tensor], train: bool = False,
                 keys: list[torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        keys = self._keys(batches, train, keys)
        if self.images.in_memory:
            data = self._resident()
            for idx, k in zip(batches, keys):
                x = to_device(data[to_device(idx, data.device)], self.device)
                yield crop_batch(x, self.spec, train, k), idx
            return
        items = [list(zip(b.tolist(), k.tolist())) for b, k in zip(batches, keys)]
        loader = DataLoader(_Lazy(self.images, self.spec, train), batch_sampler=items,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False)
        try:
            for idx, x in zip(batches, loader):
                yield x.to(self.device, non_blocking=True), idx
        except VitclError as exc:
            raise unwrap_worker_error(exc) from None


def crop_keys(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """Random-crop keys of the rows at these positions of an epoch: a function of (the epoch's seed, position)
    alone, so that ranks, micro-batches, workers and resumed runs agree."""
    return (seed % 2**30) * 2**32 + positions.long()


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
