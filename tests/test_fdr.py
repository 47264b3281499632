"""FDR: the function distance against a slow transcription, the stored logits, the extra step on the memory, a
run resumed inside a task with its own optimiser's momentum, and the config checks."""
import math

import pytest
import torch

from helpers import interrupt_at_epoch, restored
from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.methods.fdr import function_distance
from vitcl.runconfig import load_config

TINY = ["data.train_per_class=24", "data.test_per_class=10", "data.increment=[4,3,3]",
        "memory.size=30", "train.epochs=2", "train.max_batches=2", "train.batch_size=16", "eval.batch_size=64",
        "train.momentum=0.9", "run.threads=1"]


def slow_function_distance(logits, stored):
    """Per row: the softmax of the stored logits over its finite entries and of the current logits over the same
    columns, the Euclidean distance of the two; the mean over rows."""
    total = 0.0
    for cur, old in zip(logits.tolist(), stored.tolist()):
        cols = [j for j, v in enumerate(old) if math.isfinite(v)]
        zc = sum(math.exp(cur[j]) for j in cols)
        zo = sum(math.exp(old[j]) for j in cols)
        total += math.sqrt(sum((math.exp(cur[j]) / zc - math.exp(old[j]) / zo) ** 2 for j in cols))
    return total / len(logits)


def test_function_distance_is_the_transcription():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=gen)
    stored = torch.randn(5, 9, generator=gen)
    stored[:2, 3:] = float("-inf")  # stored after the first task: 3 classes
    stored[2:, 5:] = float("-inf")  # after the second: 5
    got = function_distance(logits, stored)
    assert got.item() == pytest.approx(slow_function_distance(logits, stored), rel=1e-6)
    assert function_distance(stored[:, :7].nan_to_num(neginf=-1e4), stored).item() < 1e-6


def fdr_trainer(run_dir, *overrides, preset="fdr/digits-b0inc2"):
    cfg, _ = load_config([preset], [*TINY, *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, run_dir, progress=False)


def test_fdr_stores_logits_and_steps_on_the_memory(tmp_path):
    trainer = fdr_trainer(tmp_path)
    m = trainer.method
    steps = []
    original = m.after_step
    m.after_step = lambda b, p, t, s: (steps.append(t.index if any(x.memory is not None for x in b) else None),
                                       original(b, p, t, s))
    res = trainer.fit()
    assert res["tasks_done"] == 3
    assert steps == [None] * 4 + [1] * 4 + [2] * 4  # memory steps from the second task on
    logits = m.memory.extra("logits")
    labels = trainer.scenario.train_labels[m.memory.indices()]
    assert logits.shape == (30, 10)
    width = torch.isfinite(logits).sum(1)
    assert torch.equal(width, torch.where(labels < 4, 4, torch.where(labels < 7, 7, 10)))  # seen when stored
    assert m.optimizer is not None and m.optimizer.state  # momentum buffers


@pytest.mark.parametrize("extra", [[], ["train.momentum=0.0"]])
def test_fdr_resume_mid_task_is_exact(tmp_path, extra):
    full = fdr_trainer(tmp_path / "a", *extra).fit()
    t = fdr_trainer(tmp_path / "b", *extra)
    interrupt_at_epoch(t, 4)  # task 1, after its first epoch was checkpointed
    resumed = fdr_trainer(tmp_path / "b", *extra)
    opt_state = restored(resumed, tmp_path / "b" / "checkpoints" / "last.pt")
    assert (resumed.state.task, resumed.state.epoch) == (1, 1) and resumed.method.pending is not None
    res = resumed.fit(opt_state)
    assert res["class_il"]["acc_matrix"] == full["class_il"]["acc_matrix"]


def test_fdr_refuses_a_schedule_its_memory_step_cannot_follow():
    with pytest.raises(ConfigError, match="train.schedule"):
        load_config(["fdr/digits-b0inc2"], ["train.schedule=cosine"])
    with pytest.raises(ConfigError, match="memory.size"):
        load_config(["fdr/digits-b0inc2"], ["memory.size=0"])
