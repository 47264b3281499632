"""No host synchronisation inside a training step (issue: the GPU path at full speed).

A device-to-host read stalls the GPU's queue: `Tensor.item`, `float(t)`, `bool(t)`, `int(t)`, `.tolist()`,
`.numpy()`, `.cpu()`. During a few training steps of every method, each of those called from vitcl's own code is
counted, except at the engine's read points (the progress line and the finite-loss check, every CHECK_EVERY steps)
and the integer reads of the data layer's bookkeeping, whose indices live on the host. Reads that torch makes
inside its own functions on host tensors (the optimiser's step counters) are not vitcl's and are not counted.
So is every blocking copy to a device (`.to(device)`, `.cuda()`, `torch.tensor(..., device=...)`): on a GPU it
copies from pageable memory and then waits for the stream; data/transfer.py's pinned copies do not. Syncs that
no Python call shows (boolean-mask indexing, nonzero, bincount) are what CUDA's own detector
(`torch.cuda.set_sync_debug_mode`) finds on a GPU (the CUDA tests). The evaluation's reads and copies are checked
not to grow with its number of batches.

GEM and GSS are exempt by their definitions: GEM solves its quadratic program on the host with quadprog when a
constraint is violated, and GSS scores each streamed sample against the memory on the host; each is listed with
the reads it makes.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import TINY_METHODS, tiny_method
from vitcl.api import prepare_run
from vitcl.data.transfer import device_tensor, to_device
from vitcl.engine import trainer as trainer_module
from vitcl.engine.progress import Progress

READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
PACKAGE = str(Path(trainer_module.__file__).resolve().parents[1])
# the data layer's bookkeeping, whose indices, labels and masks over them live on the host: there, reads of
# integer and bool tensors are not syncs (a floating tensor there is a model's output: its read counts)
# (and RandAugment's draws of which operation each image gets)
HOST_SIDE = tuple(str(Path(PACKAGE) / "data" / f) for f in ("stream.py", "stream_memory.py", "memory.py",
                                                             "randaugment.py"))
TRANSFER = str(Path(PACKAGE) / "data" / "transfer.py")

DATA = ["data.train_per_class=12", "data.test_per_class=4", "train.epochs=1", "train.batch_size=8",
        "train.warmup_epochs=0", "eval.batch_size=64", "train.max_batches=3", "run.threads=1"]
# the reads a method makes by its definition (see the module's docstring): file name -> allowed count
EXEMPT = {"gem": "gem.py", "gss": "gss.py"}


class HostReads:
    """Counts the reads above made from vitcl's code while `active`, with where each was made; and, in `copies`,
    the copies to a device that would wait for it on a GPU (see `wrap_copy`)."""

    def __init__(self):
        self.active, self.calls, self.copies = False, [], []

    def _caller(self) -> tuple[str, str] | None:
        frame = sys._getframe(2)
        where = frame.f_code.co_filename
        return (where, f"{Path(where).name}:{frame.f_lineno}") if where.startswith(PACKAGE) else None

    def wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            if self.active and (caller := self._caller()):
                host_side = caller[0] in HOST_SIDE and not (tensor.is_floating_point() or tensor.is_complex())
                if not host_side:
                    self.calls.append(f"{name} at {caller[1]}")
            return original(tensor, *args, **kwargs)
        return counted

    def wrap_copy(self, name, original, blocking):
        """A copy to a device: `Tensor.to(device)` without non_blocking, `Tensor.cuda()`, `torch.tensor(...,
        device=...)`. On a GPU each copies a host tensor from pageable memory and then synchronises the stream
        (data/transfer.py, where the pinned, non-blocking copies live, is the one file allowed them)."""
        def counted(*args, **kwargs):
            if self.active and blocking(args, kwargs) and (caller := self._caller()) and caller[0] != TRANSFER:
                self.copies.append(f"{name} at {caller[1]}")
            return original(*args, **kwargs)
        return counted

    @contextlib.contextmanager
    def paused(self):
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active


def _names_a_device(args, kwargs) -> bool:
    return "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:2])


def _blocking_to(args, kwargs) -> bool:
    return _names_a_device(args, kwargs) and not kwargs.get("non_blocking", False) and not (
        len(args) > 2 and isinstance(args[2], bool) and args[2])


COPIES = {(torch.Tensor, "to"): _blocking_to, (torch.Tensor, "cuda"): lambda a, k: True,
          (torch, "tensor"): lambda a, k: k.get("device") is not None,
          (torch, "as_tensor"): lambda a, k: k.get("device") is not None}


@pytest.fixture
def host_reads(monkeypatch):
    reads = HostReads()
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, reads.wrap(name, getattr(torch.Tensor, name)))
    for (owner, name), blocking in COPIES.items():
        monkeypatch.setattr(owner, name, reads.wrap_copy(name, getattr(owner, name), blocking))
    train_epoch, check_finite, draw = (trainer_module.Trainer.train_epoch, trainer_module.Trainer.check_finite,
                                       Progress._draw)

    def counted_epoch(self, *args, **kwargs):
        reads.active = True
        try:
            return train_epoch(self, *args, **kwargs)
        finally:
            reads.active = False

    def read_point(fn):
        def at_read_point(*args, **kwargs):
            with reads.paused():
                return fn(*args, **kwargs)
        return at_read_point

    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", counted_epoch)
    monkeypatch.setattr(trainer_module.Trainer, "check_finite", read_point(check_finite))
    monkeypatch.setattr(Progress, "_draw", read_point(draw))
    return reads


def tiny_run(tmp_path, method: str, device: str = "cpu"):
    preset, tiny = tiny_method(method)
    overrides = [*DATA, *tiny, "data.increment=5", f"run.out_dir={tmp_path}", "run.name=r",
                 f"run.device={device}"]
    trainer = prepare_run([preset], overrides, progress=False, announce=False)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("method", sorted(TINY_METHODS))
def test_no_host_read_in_a_training_step(tmp_path, host_reads, method):
    tiny_run(tmp_path, method)
    calls = host_reads.calls
    if method in EXEMPT:
        calls = [c for c in calls if f" at {EXEMPT[method]}:" not in c]
    assert calls == [], f"{method}: host reads inside training steps: {sorted(set(calls))}"
    copies = sorted(set(host_reads.copies))
    if method in EXEMPT:
        copies = [c for c in copies if f" at {EXEMPT[method]}:" not in c]
    assert copies == [], f"{method}: blocking copies to the device inside training steps: {copies}"


def test_the_counter_sees_a_read(host_reads):
    # the check itself: each read made from a file of the package is counted while active, none while paused
    code = compile("float(t); bool(t > 0); t.item(); t.cpu(); t.tolist()", f"{PACKAGE}/probe.py", "exec")
    t = torch.tensor(1.0)
    exec(code, {"t": t})
    assert host_reads.calls == []
    host_reads.active = True
    with host_reads.paused():
        exec(code, {"t": t})
    assert host_reads.calls == []
    exec(code, {"t": t})
    float(t)  # from the tests' own code: not vitcl's
    host_reads.active = False
    assert [c.split(" at ")[0] for c in host_reads.calls] == ["__float__", "__bool__", "item", "cpu", "tolist"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["finetune", "dytox", "er", "dark-er-pp", "icarl", "bic", "e2e", "fdr", "lvt", "l2p"])
def test_no_sync_on_cuda(tmp_path, method, monkeypatch):
    """CUDA's own detector over the training steps (outside the engine's read points): every synchronising call,
    listed with the line that made it. Its "warn" mode sees what "error" mode stops at, and lists them all."""
    train_epoch = trainer_module.Trainer.train_epoch
    check_finite = trainer_module.Trainer.check_finite

    def strict_epoch(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            return train_epoch(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def read_point(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("default")
        try:
            return check_finite(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("warn")

    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", strict_epoch)
    monkeypatch.setattr(trainer_module.Trainer, "check_finite", read_point)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_run(tmp_path, method, device="cuda")
    syncs = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)})
    assert syncs == [], f"{method}: synchronising calls inside training steps at {syncs}"


def test_to_device_is_a_plain_copy_off_the_gpu():
    t = torch.arange(6).view(2, 3).t()  # not contiguous
    out = to_device(t, "cpu", torch.float64)
    assert out.dtype == torch.float64 and torch.equal(out, t.double())
    assert torch.equal(device_tensor([True, False], "cpu"), torch.tensor([True, False]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_does_not_wait_for_the_gpu():
    busy = torch.randn(4096, 4096, device="cuda")
    t = torch.arange(6).view(2, 3).t()
    torch.cuda.set_sync_debug_mode("error")
    try:
        busy = busy @ busy  # queued work the copies must not wait for
        out, flags = to_device(t, "cuda", torch.float32), device_tensor([True, False], "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out.cpu(), t.float()) and flags.cpu().tolist() == [True, False]


@pytest.mark.parametrize("method", ["finetune", "multi-head"])  # class-IL scores, and one pass per task id
def test_evaluation_reads_the_host_once_not_per_batch(tmp_path, host_reads, method):
    """The evaluation sums its counts where the scores are: the reads and copies it makes do not grow with the
    number of test batches."""
    from vitcl.eval.evaluator import evaluate

    trainer = tiny_run(tmp_path, method)
    last = len(trainer.scenario) - 1
    made = []
    for batch_size in (1000, 7):  # one batch, then many
        host_reads.calls, host_reads.copies, host_reads.active = [], [], True
        res = evaluate(trainer.method, trainer.scenario, last, trainer.augment, trainer.test_stream, batch_size,
                       autocast=trainer.autocast)
        host_reads.active = False
        made.append((len(host_reads.calls), len(host_reads.copies), res.task_il))
    assert made[0] == made[1] and len(trainer.scenario[0].test_idx) > 7 * 2
