"""run.loggers: TensorBoard event files read back with tensorboard's own reader, CSV files, the one-line error of a
missing optional logger, and a resumed run that does not log twice."""
import csv
import importlib.util
import json
import time

import pytest

from helpers import TINY, interrupt_at_epoch, restored
from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.runconfig import load_config

OVERRIDES = [*TINY, "data.increment=5", "run.progress=false", "train.epochs=2", "train.eval_every=1"]
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard is not installed (pip install 'vitcl[tensorboard]')")


def trainer(run_dir, *overrides):
    cfg, _ = load_config(["replay/digits-b0inc2"], [*OVERRIDES, *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, run_dir, progress=False)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@needs_tensorboard
def test_tensorboard_and_csv_hold_the_runs_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = trainer(tmp_path / "r", "run.loggers=[tensorboard,csv]").fit()
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/images_per_s", "eval/seen_class_il", "eval/seen_task_il"} <= set(
        tags["scalars"])
    assert len(acc.Scalars("train/loss")) == 4  # 2 tasks x 2 epochs
    ends = [e.value for e in acc.Scalars("eval/seen_class_il") if e.step % 10000 == 9900]
    assert ends == pytest.approx(res["class_il"]["seen_acc"], abs=1e-4)
    assert {"acc_matrix/class_il", "acc_matrix/task_il"} <= set(tags["images"])
    assert "config/text_summary" in tags["tensors"]
    steps, metrics = read_csv(tmp_path / "r" / "steps.csv"), read_csv(tmp_path / "r" / "metrics.csv")
    assert [(r["task"], r["epoch"]) for r in steps] == [("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")]
    ends = [float(r["seen_class_il"]) for r in metrics if r["kind"] == "task_end"]
    assert ends == pytest.approx(res["class_il"]["seen_acc"], abs=1e-6)


def test_a_missing_logger_is_a_one_line_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec

    def hidden(name, *a, **k):
        return None if name in ("tensorboard", "wandb") else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    for name in ("tensorboard", "wandb"):
        with pytest.raises(ConfigError, match=rf"pip install 'vitcl\[{name}\]'"):
            trainer(tmp_path / name, f"run.loggers=[{name}]")
    with pytest.raises(ConfigError, match="run.loggers: unknown logger 'mlflow'"):
        load_config(["replay/digits-b0inc2"], ["run.loggers=[mlflow]"])


def test_a_resumed_run_does_not_log_twice(tmp_path):
    full = trainer(tmp_path / "full", "run.loggers=[csv]")
    full.fit()
    t = trainer(tmp_path / "cut", "run.loggers=[csv]")
    interrupt_at_epoch(t, 4)  # inside task 1, after its first epoch
    resumed = trainer(tmp_path / "cut", "run.loggers=[csv]")
    state = restored(resumed, tmp_path / "cut" / "checkpoints" / "last.pt")
    resumed.fit(state)
    for name in ("steps.csv", "metrics.csv"):
        a, b = read_csv(tmp_path / "full" / name), read_csv(tmp_path / "cut" / name)
        assert [r["step"] for r in a] == [r["step"] for r in b]


def test_wandb_logger_calls(tmp_path, monkeypatch):
    """The Weights & Biases wiring, against a stand-in module (wandb itself is not a test dependency): one init in
    the run folder with the resolved config, offline by default, scalars per epoch and evaluation, the matrices as
    tables, finish at the end."""
    import importlib.machinery
    import sys
    import types

    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", step, dict(data)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    fake.Table = lambda columns, data: ("table", columns, data)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trainer(tmp_path / "w", "run.loggers=[wandb]").fit()
    init = calls[0][1]
    assert calls[0][0] == "init" and init["mode"] == "offline" and init["dir"] == str(tmp_path / "w")
    assert init["config"]["method"]["name"] == "replay"
    logged = [c for c in calls if c[0] == "log"]
    assert sum("train/loss" in c[2] for c in logged) == 4
    tables = [c[2]["acc_matrix/class_il"] for c in logged if "acc_matrix/class_il" in c[2]]
    assert len(tables) == 2 and tables[-1][2][1][1] is not None
    assert calls[-1] == ("finish",)


def test_steps_csv_times_each_epoch_alone(tmp_path):
    """steps.csv's seconds and images/s are those of the epoch itself (not the phase so far): a pause inside one
    epoch shows in that row only, and seconds x images/s adds up to the task's images."""
    t = trainer(tmp_path / "r", "run.loggers=[csv]")
    original, calls = t.train_epoch, {"n": 0}

    def slow_second(*a, **k):
        calls["n"] += 1
        loss = original(*a, **k)
        if calls["n"] == 2:  # task 0, epoch 2
            time.sleep(1.0)
        return loss

    t.train_epoch = slow_second
    t.fit()
    steps = read_csv(tmp_path / "r" / "steps.csv")
    seconds = [float(r["seconds"]) for r in steps]
    assert seconds[1] >= 1.0 and seconds[2] < 1.0 and seconds[0] < 1.0
    ends = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    images = [r["images"] for r in ends if r["kind"] == "task_end"]
    for task, n in enumerate(images):
        rows = [r for r in steps if r["task"] == str(task)]
        assert sum(float(r["seconds"]) * float(r["images_per_s"]) for r in rows) == pytest.approx(n, rel=0.02)
