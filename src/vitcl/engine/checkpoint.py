"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename over the target.

A signal that arrives while a checkpoint is being written is held back until the rename is done: the command
line's handlers for SIGINT and SIGTERM ask `defer_signal` first, and the signal is raised again once the write
ends, so an interrupted run always keeps a whole checkpoint (the new one or the one before).
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path

import torch

from ..errors import VitclError

_writing = 0
_pending: list[int] = []


def defer_signal(signum: int) -> bool:
    """For a signal handler: True while a checkpoint is being written (the signal is raised again after it)."""
    if _writing:
        _pending.append(signum)
        return True
    return False


@contextlib.contextmanager
def _signals_deferred():
    global _writing
    _writing += 1
    try:
        yield
    finally:
        _writing -= 1
        if not _writing and _pending:
            signum = _pending[0]
            _pending.clear()
            signal.raise_signal(signum)


def save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _signals_deferred():
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
