"""Shared test settings: a tiny digits run that takes a second or two on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

TINY = [
    "data.train_per_class=24", "data.test_per_class=10",
    "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
    "train.epochs=2", "train.batch_size=16", "train.warmup_epochs=0", "eval.batch_size=64",
]


def run_cli(*args: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vitcl", *args], capture_output=True, text=True, env=env, **kwargs)
    if check and proc.returncode:
        raise AssertionError(f"vitcl {' '.join(args)} failed:\n{proc.stderr}")
    return proc


# fields of metrics.jsonl and results.json that differ between two runs of the same config (wall clock, memory)
TIMING = ("seconds", "images_per_s", "peak_memory_bytes")


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def metrics_records(run_dir: Path) -> list:
    """metrics.jsonl of a run, timing fields aside."""
    return [without_timing(json.loads(x)) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def interrupt_at_epoch(trainer, n: int) -> None:
    """Run trainer.fit() and stop it (KeyboardInterrupt) as its n-th epoch, counted over tasks and phases, begins:
    the epochs before it are checkpointed, as a killed run leaves them."""
    import pytest

    original, calls = trainer.train_epoch, {"n": 0}

    def stop(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    trainer.train_epoch = stop
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def restored(trainer, checkpoint: Path):
    """The optimiser state to pass to trainer.fit(), after restoring trainer from a checkpoint file."""
    import torch

    return trainer.restore(torch.load(checkpoint, weights_only=False))
