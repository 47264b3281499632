import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import SRC, TINY
from vitcl.engine.trainer import Trainer
from vitcl.runconfig import load_config

OVERRIDES = [*TINY, "data.increment=5", "memory.size=40", "train.batch_size=16"]


def test_two_processes_hold_the_same_memory_as_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).parent / "ddp_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(tmp_path), *OVERRIDES], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
