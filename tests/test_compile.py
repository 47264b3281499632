"""run.compile: a compiled DyTox compiles its shared encoder and decoder once per run, not once per task.

The bound this design allows, for any number of tasks: one graph per kind of call of each compiled module (a
training step, a training step with the encoder frozen (the balanced fine-tuning), the teacher's call under no_grad,
evaluation under inference_mode), and for the decoder one set with one task token and one with the token count
dynamic (2 and up): at most 4 encoder graphs + 8 decoder graphs. Counted with dynamo's own counter (backend
`eager`: dynamo traces, no code generation, so the test takes seconds)."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from vitcl.api import prepare_run
from vitcl.engine import trainer as trainer_module

TINY = ["data.train_per_class=12", "data.test_per_class=6", "train.epochs=1", "train.batch_size=8",
        "train.warmup_epochs=0", "eval.batch_size=64", "train.max_batches=3", "run.threads=1", "run.device=cpu",
        "model.embed_dim=16", "model.depth=2", "model.num_heads=2", "model.local_up_to_layer=1",
        "data.increment=[5,1,1,1,1,1]"]
BOUND = 4 + 8


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def six_tasks(tmp_path, name, compile_on, monkeypatch):
    per_task = []
    finish = trainer_module.Trainer.finish_task

    def counted(self, task, seconds):
        finish(self, task, seconds)
        per_task.append(graphs())

    monkeypatch.setattr(trainer_module.Trainer, "finish_task", counted)
    torch._dynamo.reset()
    counters.clear()
    trainer = prepare_run(["dytox/digits-b0inc2"], [*TINY, f"run.compile={str(compile_on).lower()}",
                                                    "run.compile_backend=eager", f"run.out_dir={tmp_path}",
                                                    f"run.name={name}"], progress=False, announce=False)
    return trainer.fit(), per_task


def test_compiled_dytox_does_not_recompile_per_task(tmp_path, monkeypatch):
    eager, _ = six_tasks(tmp_path, "eager", False, monkeypatch)
    compiled, per_task = six_tasks(tmp_path, "compiled", True, monkeypatch)
    assert len(per_task) == 6
    # tasks 1 and 2 meet every kind of call (the second has the fine-tuning and 2 tokens); later tasks add none
    assert per_task[1] == per_task[-1] <= BOUND, per_task
    for section in ("class_il", "task_il"):
        for got, want in zip(compiled[section]["acc_matrix"], eager[section]["acc_matrix"]):
            assert got == pytest.approx(want, abs=1e-6, nan_ok=True)
    assert compiled["class_il"]["acc_matrix"] != [] and per_task[0] > 0


def test_fast_overlay_on_a_preset_and_the_presets_keep_fp32():
    from vitcl.runconfig import load_config
    plain, _ = load_config(["dytox/cifar100-b0inc10"], [])
    assert (plain.run.precision, plain.run.compile, plain.run.tf32, plain.run.channels_last) == ("fp32", False,
                                                                                               False, False)
    fast, _ = load_config(["dytox/cifar100-b0inc10", "overlays/fast"], [])
    assert (fast.run.precision, fast.run.compile, fast.run.tf32, fast.run.channels_last) == ("bf16", True, True, True)
    assert (fast.eval.batch_size, fast.eval.fit_batch) == (4096, True) and fast.method == plain.method and fast.train == plain.train


def test_channels_last_gives_the_same_run(tmp_path):
    from vitcl.api import run
    tiny = {"data.train_per_class": 12, "data.test_per_class": 6, "train.epochs": 1, "train.max_batches": 2,
            "model.width": 8, "run.threads": 1, "data.increment": 5}
    a = run(["icarl/digits-b0inc2"], overrides=tiny, out_dir=tmp_path, name="a", progress=False)
    b = run(["icarl/digits-b0inc2"], overrides={**tiny, "run.channels_last": True}, out_dir=tmp_path, name="b",
            progress=False)
    for got, want in zip(b.matrix("class_il"), a.matrix("class_il")):
        assert got == pytest.approx(want, abs=1e-6, nan_ok=True)
