import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import SRC, TINY, interrupt_at_epoch, restored, run_cli
from vitcl.engine.trainer import Trainer
from vitcl.errors import TrainingError
from vitcl.runconfig import load_config


def make_trainer(run_dir, *overrides, preset="replay/digits-b0inc2"):
    cfg, _ = load_config([preset], [*TINY, *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, run_dir, progress=False)


def test_run_writes_results_metrics_and_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path / "r")
    res = trainer.fit()
    assert res["tasks_done"] == 5
    cil, til = res["class_il"], res["task_il"]
    assert len(cil["acc_matrix"]) == 5 and all(0 <= a <= 100 for a in cil["seen_acc"])
    assert cil["avg_incremental"] == pytest.approx(sum(cil["seen_acc"]) / 5)
    # task-IL is never below class-IL on the same pass (restricting the argmax can only help)
    assert all(t >= c - 1e-9 for t, c in zip(til["seen_acc"], cil["seen_acc"]))
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [x["task"] for x in lines if x["kind"] == "task_end"] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == \
        ["last.pt"] + [f"task_{i}.pt" for i in range(5)]
    assert len(trainer.method.memory) == 200 // 10 * 10  # 20 exemplars for each of the 10 classes
    assert res["params"]["growth_per_task"][1] == 16 * 2 + 2  # one head of 2 classes on a 16-d embedding


def test_periodic_evaluation_is_logged(tmp_path):
    make_trainer(tmp_path / "r", "train.eval_every=1", "data.increment=5").fit()
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["periodic", "task_end", "periodic", "task_end"]


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path / "r")
    original = trainer.method.loss

    def poisoned(batch, phase, task):
        loss, logs = original(batch, phase, task)
        return (loss * math.nan if task.index == 1 else loss), logs

    trainer.method.loss = poisoned
    with pytest.raises(TrainingError, match="task 1 'train' epoch 1: the loss is nan"):
        trainer.fit()
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["progress"]["task"] == 1 and (tmp_path / "r" / "results.json").exists()


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    args = ["run", "replay/digits-b0inc2", *TINY, "train.epochs=3", f"run.out_dir={tmp_path}"]
    run_cli(*args, "run.name=full", "-q", check=True)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vitcl", *args, "run.name=cut", "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "cut" / "checkpoints" / "task_1.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _results(tmp_path / "cut")["tasks_done"] < 5, "the run ended before it could be killed"
    run_cli("resume", str(tmp_path / "cut"), "-q", check=True)
    full, cut = _results(tmp_path / "full"), _results(tmp_path / "cut")
    for key in ("class_il", "task_il"):
        assert cut[key]["acc_matrix"] == full[key]["acc_matrix"]
    a = torch.load(tmp_path / "full" / "checkpoints" / "task_4.pt", weights_only=False)["method"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "task_4.pt", weights_only=False)["method"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["memory"]["exemplars"][3], b["memory"]["exemplars"][3])


def test_resume_mid_phase_in_process_is_exact(tmp_path):
    opts = ("train.epochs=3", "data.increment=5")
    full = make_trainer(tmp_path / "a", *opts).fit()
    t = make_trainer(tmp_path / "b", *opts)
    interrupt_at_epoch(t, 5)  # inside task 1, after its first epoch was checkpointed
    resumed = make_trainer(tmp_path / "b", *opts)
    opt_state = restored(resumed, tmp_path / "b" / "checkpoints" / "last.pt")
    assert (resumed.state.task, resumed.state.epoch) == (1, 1)
    res = resumed.fit(opt_state)
    assert res["class_il"]["acc_matrix"] == full["class_il"]["acc_matrix"]


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as JSON.parse and jq do."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_cli_run_eval_report_params(tmp_path):
    out = run_cli("run", "replay/digits-b0inc2", *TINY, "data.increment=5", f"run.out_dir={tmp_path}", "run.name=x",
                  "eval.analyses=[nonlocality]", "-q", check=True)
    assert "avg incremental acc" in out.stdout
    run_dir = tmp_path / "x"
    for f in ("config.yaml", "metrics.jsonl", "results.json", "plots/accuracy.png", "plots/acc_matrix_class_il.png",
              "analysis/locality.json"):
        assert (run_dir / f).exists(), f
    ev = run_cli("eval", str(run_dir), check=True)
    re_eval = json.loads((run_dir / "eval.json").read_text())
    assert re_eval["class_il"]["acc_matrix"] == _results(run_dir)["class_il"]["acc_matrix"], ev.stdout
    # every JSON file the run wrote is strict JSON; the matrices' unfilled half is null, not NaN
    files = [*run_dir.rglob("*.json"), *run_dir.rglob("*.jsonl")]
    assert len(files) >= 5
    for path in files:
        for line in (path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]):
            strict_json(line)
    assert _results(run_dir)["class_il"]["acc_matrix"][0][1] is None
    again = run_cli("resume", str(run_dir), check=True)
    assert "all 2 tasks are done; nothing to resume" in again.stderr and "task 3/2" not in again.stderr
    rep = run_cli("report", str(run_dir), str(run_dir), check=True)
    assert rep.stdout.count("| x | replay |") == 2
    par = run_cli("params", "replay/digits-b0inc2", "--json", check=True)
    rows = json.loads(par.stdout)
    assert len(rows) == 5 and rows[-1]["growth"] == 4 * (64 * 2 + 2)


def test_cli_refuses_to_overwrite_a_run(tmp_path):
    run_cli("run", "replay/digits-b0inc2", *TINY, "data.increment=10", f"run.out_dir={tmp_path}", "run.name=x", "-q", check=True)
    again = run_cli("run", "replay/digits-b0inc2", *TINY, "data.increment=10", f"run.out_dir={tmp_path}", "run.name=x", "-q")
    assert again.returncode == 2 and "vitcl resume" in again.stderr


@pytest.mark.parametrize("args,needle", [
    (["run", "train.epochz=1"], "train.epochz: unknown key"),
    (["run", "no/such-preset"], "no/such-preset: no such preset"),
    (["run", "dytox/cifar100-b0inc1O"], "did you mean dytox/cifar100-b0inc10 or"),  # the closest name first
    (["run", "replay/digits-b0inc2", "overlay/fast"], "overlay/fast: no such preset or YAML file; did you mean "
                                                      "overlays/fast?"),
    (["run", "data.class_order=[0,1,1,2,3,4,5,6,7,8]"], "data.class_order: classes [1] appear more than once"),
    (["run", "data.increment=3"], "data.increment: 7 classes after the first task do not split"),
    (["resume", "/nonexistent/run"], "config.yaml: not found"),
    (["eval", "/nonexistent/run"], "config.yaml: not found"),
    (["report", "/nonexistent/run"], "results.json: no results"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_resume_before_the_first_checkpoint_starts_over_and_clears_stale_files(tmp_path):
    run_cli("run", "replay/digits-b0inc2", *TINY, "data.increment=10", f"run.out_dir={tmp_path}", "run.name=cut", "-q",
            check=True)
    cut = tmp_path / "cut"
    uninterrupted = _results(cut)["class_il"]["acc_matrix"]
    shutil.rmtree(cut / "checkpoints")  # as if killed before the first checkpoint: only config.yaml was written
    (cut / "results.json").unlink()
    (cut / "checkpoints").mkdir()
    stale = [cut / "checkpoints" / "last.ptab12.tmp", cut / "results.json.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    res = run_cli("resume", str(cut), "-q", check=True)
    assert "starting it from the beginning" in res.stderr
    assert not any(p.exists() for p in stale)
    assert _results(cut)["class_il"]["acc_matrix"] == uninterrupted
    assert (cut / "metrics.jsonl").read_text().count("task_end") == 1


def test_corrupt_checkpoint_is_reported(tmp_path):
    run_cli("run", "replay/digits-b0inc2", *TINY, "data.increment=10", f"run.out_dir={tmp_path}", "run.name=x", "-q", check=True)
    (tmp_path / "x" / "checkpoints" / "last.pt").write_bytes(b"garbage")
    proc = run_cli("resume", str(tmp_path / "x"))
    assert proc.returncode == 2 and "last.pt: not a readable vitcl checkpoint" in proc.stderr


def test_bf16_autocast_run(tmp_path):
    res = make_trainer(tmp_path / "r", "run.precision=bf16", "data.increment=5", "train.epochs=1").fit()
    assert res["tasks_done"] == 2 and all(math.isfinite(a) for a in res["class_il"]["seen_acc"])


def test_the_loss_is_read_on_the_host_once_per_epoch_of_few_steps(tmp_path, monkeypatch):
    """Steps leave their loss on the device; the NaN check reads it every CHECK_EVERY steps and at the epoch's
    end, so an epoch of fewer steps is read once."""
    from vitcl.engine import trainer as trainer_module

    trainer = make_trainer(tmp_path / "r")
    reads = []
    check = trainer_module.Trainer.check_finite

    def counted(self, loss_sum, task, phase, epoch):
        reads.append((task.index, phase.name, epoch))
        return check(self, loss_sum, task, phase, epoch)

    monkeypatch.setattr(trainer_module.Trainer, "check_finite", counted)
    monkeypatch.setattr(trainer_module, "CHECK_EVERY", 10**6)
    trainer.fit()
    assert reads and len(reads) == len(set(reads))


def test_fit_batch_halves_the_evaluation_batch_that_runs_out_of_memory(tmp_path):
    """eval.fit_batch: a batch too large for the device halves eval.batch_size for the rest of the run and the
    evaluation starts again; the accuracies are those of a run that fits, and the model keeps its mode."""
    opts = ("data.increment=5", "eval.batch_size=64")

    def on_a_small_device(trainer):
        scores = trainer.method.scores

        def small(x, *a, **k):
            if len(x) > 16:
                raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
            return scores(x, *a, **k)

        trainer.method.scores = small
        return trainer

    plain = make_trainer(tmp_path / "a", *opts).fit()
    fitted = on_a_small_device(make_trainer(tmp_path / "b", *opts, "eval.fit_batch=true"))
    assert fitted.fit()["class_il"]["acc_matrix"] == plain["class_il"]["acc_matrix"] and fitted.eval_batch == 16
    strict = on_a_small_device(make_trainer(tmp_path / "c", *opts))
    with pytest.raises(torch.OutOfMemoryError):
        strict.fit()
    assert strict.method.model.training  # the failed evaluation put the training mode back
