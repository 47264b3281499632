"""vitcl sweep (grid, launchers, resume) and vitcl report SWEEP_DIR (mean ± sample std beside the published)."""
import csv
import io
import json
import math
import statistics
import sys

import pytest
import yaml

from vitcl import cli, sweep
from vitcl.errors import ConfigError
from vitcl.eval.aggregate import Group, aggregate

TINY = ["data.train_per_class=24", "data.test_per_class=10", "model.embed_dim=16", "model.depth=1",
        "model.num_heads=2", "train.epochs=1", "train.batch_size=16", "train.warmup_epochs=0",
        "eval.batch_size=64", "train.max_batches=2", "data.class_order=random"]
GRID = ["--grid", "run.seed=0,1", "--grid", "data.class_order_seed=1,2"]


def _states(folder):
    return [r["state"] for r in yaml.safe_load((folder / "sweep.yaml").read_text())["runs"]]


def _sweep(*args):
    return cli.main(["sweep", "finetune/digits-b0inc2", *TINY, *args, "-q"])


def test_sequential_2x2_then_report(tmp_path, capsys):
    out = tmp_path / "sw"
    assert _sweep(*GRID, "--out", str(out)) == 0
    doc = yaml.safe_load((out / "sweep.yaml").read_text())
    assert doc["grid"] == {"run.seed": ["0", "1"], "data.class_order_seed": ["1", "2"]}
    assert _states(out) == ["done"] * 4 and doc["machine"]["hostname"]
    names = [r["name"] for r in doc["runs"]]
    assert all((out / n / "results.json").exists() for n in names)
    capsys.readouterr()
    assert cli.main(["report", str(out), "--format", "json"]) == 0
    table = json.loads(capsys.readouterr().out)
    (row,) = table["rows"]
    lasts = [json.loads((out / n / "results.json").read_text())["class_il"]["last"] for n in names]
    assert row["runs"] == 4 and row["last_mean"] == pytest.approx(statistics.mean(lasts))
    assert row["last_std"] == pytest.approx(statistics.stdev(lasts))
    # a finished sweep resumed runs nothing
    assert cli.main(["sweep", "--resume", str(out), "-q"]) == 0
    assert "0 to run" in capsys.readouterr().err


@pytest.mark.parametrize("slots", [["--slots", "2"], ["--gpus", "0,1"]], ids=["cpu-slots", "gpu-slots"])
def test_local_launcher_2x2(tmp_path, capsys, slots):
    # two subprocesses at once; with --gpus each sees only its GPU (CUDA_VISIBLE_DEVICES; on this CPU-only
    # machine the runs fall back to the CPU, as `run.device: auto` does)
    out = tmp_path / "sw"
    assert _sweep(*GRID, "--out", str(out), "--launcher", "local", *slots) == 0
    assert _states(out) == ["done"] * 4
    assert len(list((out / "logs").glob("*.log"))) == 4
    err = capsys.readouterr().err
    if slots[0] == "--gpus":
        assert err.count("on GPU 0") + err.count("on GPU 1") == 4 and "on GPU 1" in err


def test_failed_run_listed_and_resume_runs_only_what_is_missing(tmp_path, capsys):
    out = tmp_path / "sw"
    assert _sweep("--grid", "run.seed=0,1", "--out", str(out)) == 0
    doc = yaml.safe_load((out / "sweep.yaml").read_text())
    first, second = (out / r["name"] for r in doc["runs"])
    # the second run broken: its results gone and its config made impossible (as a crash would leave it)
    (second / "results.json").unlink()
    cfg = yaml.safe_load((second / "config.yaml").read_text())
    cfg["train"]["epochs"] = -1
    (second / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = (first / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["sweep", "--resume", str(out), "-q"]) == 1
    text = capsys.readouterr()
    assert _states(out) == ["done", "failed"]
    error = yaml.safe_load((out / "sweep.yaml").read_text())["runs"][1]["error"]
    assert "train.epochs" in error and f"{second.name}: {error}" in text.out
    # repaired: only the missing run runs (it is resumed from its folder); the finished one is untouched
    cfg["train"]["epochs"] = 1
    (second / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["sweep", "--resume", str(out), "-q"]) == 0
    assert "1 to run" in capsys.readouterr().err
    assert _states(out) == ["done", "done"] and (first / "results.json").stat().st_mtime_ns == before


def test_interrupted_sweep_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sw"
    real = cli._sweep_in_process
    calls = []

    def stop_on_second(argv):
        calls.append(argv)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(argv)

    monkeypatch.setattr(cli, "_sweep_in_process", stop_on_second)
    assert _sweep("--grid", "run.seed=0,1,2", "--out", str(out)) == 130
    assert _states(out) == ["done", "interrupted", "interrupted"]
    monkeypatch.setattr(cli, "_sweep_in_process", real)
    capsys.readouterr()
    assert cli.main(["sweep", "--resume", str(out), "-q"]) == 0
    assert "2 to run" in capsys.readouterr().err and _states(out) == ["done"] * 3


@pytest.mark.parametrize("grid, expected", [
    (["--grid", "train.nope=1,2"], "train.nope"),
    (["--grid", "run.seed="], "empty value"),
    (["--grid", "run.seed=0,,1"], "empty value"),
    (["--grid", "run.seed=0,1", "--grid", "run.seed=2"], "given twice"),
    (["--grid", "train.epochs=1,x"], "train.epochs"),
    (["--grid", "data.dataset=digits,digts"], "did you mean 'digits'"),  # a name: checked with no file read
    (["--grid", "data.increment=5,3"], "data.increment: 7 classes after the first task do not split"),
])
def test_bad_grid_is_one_line_before_anything_runs(tmp_path, capsys, grid, expected):
    out = tmp_path / "sw"
    assert _sweep(*grid, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitcl: error: ") and expected in err and "\n" not in err
    assert not (out / "sweep.yaml").exists()


def test_grid_values_keep_lists():
    assert sweep.split_values("[10,5],[5,5]") == ["[10,5]", "[5,5]"]
    assert sweep.parse_grid(["data.increment=[2,2],4"], []) == {"data.increment": ["[2,2]", "4"]}
    with pytest.raises(ConfigError, match="also a fixed override"):
        sweep.parse_grid(["run.seed=1,2"], ["run.seed=3"])


def test_slurm_launcher_through_submitit_debug_executor(tmp_path, capsys):
    pytest.importorskip("submitit", reason="the slurm extra (pip install 'vitcl[slurm]') is not installed")
    out = tmp_path / "sw"
    s = sweep.new_sweep(["finetune/digits-b0inc2"], TINY, ["run.seed=0"], str(out),
                        {"name": "slurm", "partition": "p", "gpus_per_run": 1, "timeout": 5})
    assert sweep.launch(s, cli._sweep_in_process, executor_cluster="debug", log=lambda _: None) == []
    assert _states(out) == ["done"]
    run = yaml.safe_load((out / "sweep.yaml").read_text())["runs"][0]
    assert run["machine"]["hostname"]
    # preemption: checkpoint() requeues a job that resumes the run from its folder, with torchrun above 1 GPU
    job = sweep.SlurmRun(s.argv(s.runs[0]), str(out / run["name"]), gpus_per_run=2)
    requeued = job.checkpoint()
    cmd = requeued.function.command()
    assert cmd[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"]
    assert cmd[3:7] == ["-m", "vitcl", "resume", str(out / run["name"])]


def test_missing_submitit_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    assert _sweep("--out", str(tmp_path / "sw"), "--launcher", "slurm", "--partition", "p") == 2
    err = capsys.readouterr().err.strip()
    assert err == "vitcl: error: --launcher slurm needs submitit: pip install 'vitcl[slurm]'"


def _results(last, avg, increments=(2, 2), published=None):
    r = {"method": "m", "increments": list(increments), "tasks_done": 2, "num_tasks": 2,
         "class_il": {"avg_incremental": avg, "last": last, "forgetting": 1.0, "seen_acc": [avg, last],
                      "seen_topk": [99.0, 98.0], "avg_incremental_topk": 98.5},
         "task_il": None, "params": {"final": 2_000_000}}
    if published:
        r["published"] = published
    return r


def test_report_mean_and_std_by_hand_and_formats(tmp_path):
    pub = {"source": "Paper, Table 1", "row": "M", "column": "2 steps", "values": {"last": 50.0, "avg_top5": 97.0},
           "std": {"last": 0.5}}
    lasts, avgs = [40.0, 44.0, 45.0], [60.0, 61.0, 65.0]
    group = Group("m/preset", "m/preset", [_results(la, av, published=pub) for la, av in zip(lasts, avgs)])
    table = aggregate([group, Group("other", "other", [_results(10.0, 20.0)])])
    assert table.metrics == ["avg", "last", "forgetting", "avg_top5", "params_m"]
    row = table.rows[0]
    mean = (40 + 44 + 45) / 3
    std = math.sqrt(((40 - mean) ** 2 + (44 - mean) ** 2 + (45 - mean) ** 2) / 2)  # ddof=1
    assert row["last_mean"] == pytest.approx(mean) and row["last_std"] == pytest.approx(std)
    assert row["last_published"] == 50.0 and row["last_diff"] == pytest.approx(mean - 50.0)
    assert row["params_m_mean"] == pytest.approx(2.0) and row["avg_top5_published"] == 97.0
    assert table.rows[1]["last_std"] is None  # one run: no sample std
    md = table.to_markdown()
    assert f"{mean:.2f} ± {std:.2f} / 50.00 ± 0.50 ({mean - 50:+.2f})" in md and "ddof=1" in md
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert float(rows[0]["last_std"]) == pytest.approx(std) and rows[1]["last_std"] == ""
    assert json.loads(table.to_json())["rows"][1]["last_std"] is None
    latex = table.to_latex()
    assert latex.startswith(r"\begin{tabular}{lrrrrrr}") and latex.count(r"\\") == 3
    assert r"$\pm$" in latex


def test_report_plot(tmp_path):
    group = Group("g", "g", [_results(40.0, 60.0), _results(44.0, 62.0)])
    from vitcl.eval.aggregate import plot_groups

    path = plot_groups([group], tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
