"""Shared test settings: a tiny digits run that takes a second or two on CPU."""
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
