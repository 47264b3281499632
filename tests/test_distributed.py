import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SRC, TINY
from vitcl.engine.trainer import Trainer
from vitcl.runconfig import load_config

OVERRIDES = [*TINY, "data.increment=5", "memory.size=40", "train.batch_size=16"]


def two_processes(tmp_path, *args: str) -> None:
    """ddp_worker.py under torchrun with two processes (gloo, CPU)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).parent / "ddp_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(tmp_path), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_hold_the_same_memory_as_one(tmp_path):
    two_processes(tmp_path, *OVERRIDES)
    m0 = torch.load(tmp_path / "memory_rank0.pt")
    m1 = torch.load(tmp_path / "memory_rank1.pt")
    assert sorted(m0["exemplars"]) == list(range(10))
    for c in m0["exemplars"]:
        assert torch.equal(m0["exemplars"][c], m1["exemplars"][c])

    # one process, the same weights: the selection of the last task's classes is the same
    cfg, _ = load_config(["replay/digits-b0inc2"], OVERRIDES)
    trainer = Trainer(cfg, tmp_path / "single", progress=False)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "task_1.pt", weights_only=False)
    trainer.restore(ckpt)
    task = trainer.scenario[1]
    for c in task.labels:
        trainer.method.memory.exemplars.pop(c)
    trainer.method.update_memory(task, trainer)
    single = trainer.method.memory.exemplars
    for c in m0["exemplars"]:
        assert torch.equal(single[c], m0["exemplars"][c]), c


# the reductions of HAL (feature means, the finetuned copy's gradients) and of GEM (per-task gradients over the
# ranks' shares of the drawn memory)
@pytest.mark.parametrize("method", ["hal", "gem"])
def test_methods_that_reduce_over_ranks_keep_the_ranks_equal(tmp_path, method):
    """Both processes end with the same weights and the same method state: every reduction a method makes of its
    own reaches both ranks alike."""
    two_processes(tmp_path, f"{method}/digits-b0inc2", "data.train_per_class=24", "data.test_per_class=10",
                  "model.width=8", "data.increment=5", "memory.size=20", "train.epochs=1", "train.batch_size=16",
                  "eval.batch_size=64", *(["method.anchor_steps=3", "method.finetune_steps=2"] if method == "hal" else []))
    states = [torch.load(tmp_path / f"method_rank{r}.pt", weights_only=False) for r in (0, 1)]
    model = [k for k in states[0]["model"]]
    assert model and all(torch.equal(states[0]["model"][k], states[1]["model"][k]) for k in model)
    extra = states[0].get("extra", {})
    for k, v in extra.items():
        if torch.is_tensor(v):
            assert torch.equal(v, states[1]["extra"][k]), k
    if method == "hal":
        assert extra["anchors"].shape[0] == 10 and torch.count_nonzero(extra["means"]) > 0  # 5 per task
