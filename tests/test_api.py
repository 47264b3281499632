"""The Python API (vitcl.run, vitcl.load_run, vitcl.report): the same run folders as the command line."""
import json

import pytest
import torch

import vitcl
from helpers import TINY, run_cli, without_timing
from vitcl.errors import VitclError

OVERRIDES = [*TINY, "data.increment=5", "run.progress=false"]


def test_run_equals_the_cli_and_loads_back(tmp_path):
    run = vitcl.run(["replay/digits-b0inc2"], overrides=OVERRIDES, out_dir=tmp_path, name="api", progress=False)
    run_cli("run", "replay/digits-b0inc2", *OVERRIDES, f"run.out_dir={tmp_path}", "run.name=cli", "-q", check=True)
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert without_timing(run.results["class_il"]) == without_timing(cli["class_il"])
    assert run.matrix("task_il") == cli["task_il"]["acc_matrix"]
    again = vitcl.load_run(tmp_path / "api")
    assert again.config.method.name == "replay" and again.results == run.results
    assert [m["kind"] for m in again.metrics if m.get("kind") == "task_end"] == ["task_end"] * 2
    assert "avg incremental acc" in again.summary()
    with pytest.raises(ValueError, match="setting"):
        again.matrix("both")


def test_model_after_a_task_is_that_tasks_checkpoint(tmp_path):
    run = vitcl.run("replay/digits-b0inc2", overrides={"data.increment": 5, **dict(o.split("=", 1) for o in TINY)},
                    out_dir=tmp_path, name="m", progress=False)
    first, last = run.model(0), run.model(1)
    ckpt = torch.load(tmp_path / "m" / "checkpoints" / "task_0.pt", weights_only=False)["method"]["model"]
    assert all(torch.equal(v, ckpt[k]) for k, v in first.model.state_dict().items())
    assert first.seen == 5 and last.seen == 10
    x = torch.zeros(2, 1, 8, 8)
    assert last.logits(x).shape == (2, 10)
    with pytest.raises(VitclError, match="task_7.pt"):
        run.model(7)


def test_report_of_runs(tmp_path):
    run = vitcl.run(["replay/digits-b0inc2"], overrides=OVERRIDES, out_dir=tmp_path, name="r", progress=False)
    table = vitcl.report([run.path])
    assert "replay" in table.to_markdown() and len(table.rows) == 1
