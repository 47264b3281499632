"""Host-to-device copies that do not wait for the device.

A plain `t.to(cuda)` of a host tensor (and `torch.tensor(values, device=cuda)`) copies from pageable memory and
then synchronises the stream: the host waits for every kernel queued before it, once per call. Inside a training
step that stalls the GPU at each batch. `to_device` stages the copy through pinned memory instead, so it is
queued like a kernel; the caching host allocator keeps the pinned buffer until the copy has run. On the CPU (and
for a tensor already there) it is a plain `.to`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    device = torch.device(device)
    if device.type != "cuda" or t.device == device:
        return t.to(device=device, dtype=dtype)
    if t.device.type != "cpu":  # device to device: queued already
        return t.to(device=device, dtype=dtype, non_blocking=True)
    return t.contiguous().pin_memory().to(device=device, dtype=dtype, non_blocking=True)  # dense: one copy


def device_tensor(values: Sequence | float | int | bool, device: torch.device | str,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values, device=device), without the synchronisation of its copy."""
    return to_device(torch.tensor(values, dtype=dtype), device)
