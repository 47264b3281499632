"""The engine's side memory batch (Phase.memory_batch) and the confidence selector through the base Method."""
import torch

from vitcl.engine.trainer import Trainer
from vitcl.runconfig import load_config


def _trainer(tmp_path, sources, overrides):
    cfg, _ = load_config(sources, ["run.progress=false", "train.epochs=1", "data.increment=5"] + overrides)
    (tmp_path / "run").mkdir()
    return Trainer(cfg, tmp_path / "run", progress=False)


def test_memory_batch_rows_are_a_seeded_draw_from_the_memory(tmp_path):
    tr = _trainer(tmp_path, ["lvt/digits-b0inc2"], ["train.max_batches=1"])
    memory = torch.arange(100, 140)
    a = tr.memory_batch_rows(memory, 16, 2, (0, 1, 0, 0, 3, "memory-batch"))
    b = tr.memory_batch_rows(memory, 16, 2, (0, 1, 0, 0, 3, "memory-batch"))
    c = tr.memory_batch_rows(memory, 16, 2, (0, 1, 0, 0, 4, "memory-batch"))
    assert [len(x) for x in a] == [8, 8] and all(torch.equal(x, y) for x, y in zip(a, b))
    drawn = torch.cat(a)
    assert len(drawn.unique()) == 16 and torch.isin(drawn, memory).all()
    assert not torch.equal(drawn, torch.cat(c))
    assert tr.memory_batch_rows(None, 16, 2, (0,)) == [None, None]
    assert torch.equal(torch.cat(tr.memory_batch_rows(memory[:5], 16, 1, (0,))).sort().values, memory[:5])


def test_lvt_steps_get_memory_batches_after_the_first_task(tmp_path):
    tr = _trainer(tmp_path, ["lvt/digits-b0inc2"], ["train.max_batches=2", "memory.size=20",
                                                    "method.memory_batch=8"])
    seen = []
    loss = tr.method.loss

    def spy(batch, phase, task):
        seen.append((task.index, None if batch.memory is None else batch.memory.index.clone(),
                     None if batch.memory is None else batch.memory.from_memory))
        return loss(batch, phase, task)

    tr.method.loss = spy
    tr.fit()
    first = [m for t, m, _ in seen if t == 0]
    later = [(m, f) for t, m, f in seen if t == 1]
    assert first == [None, None] and len(later) == 2
    stored = tr.method.memory.indices()
    for rows, flag in later:
        assert len(rows) == 8 and flag.all()
    # during task 1 the memory held only the first task's exemplars (4 per class; 2 per class are kept after it)
    labels = tr.scenario.train_labels
    assert all((labels[rows] < 5).all() and len(rows.unique()) == 8 for rows, _ in later) and len(stored) == 20


def test_replay_with_confidence_selection(tmp_path):
    tr = _trainer(tmp_path, ["replay/digits-b0inc2"], ["train.max_batches=1", "memory.size=20",
                                                       "memory.selection=confidence"])
    tr.fit()
    mem = tr.method.memory
    assert len(mem) == 20 and set(mem.exemplars) == set(range(10))
