"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename over the target."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..errors import VitclError


def save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict:
    if not path.exists():
        raise VitclError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise VitclError(f"{path}: not a readable vitcl checkpoint ({exc.__class__.__name__})") from None
