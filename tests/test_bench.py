"""vitcl bench: a method's full training step and inference on random images of the preset's shape."""
import pytest

from helpers import TINY_METHODS, tiny_method
from vitcl import cli
from vitcl.bench import bench_config, run_bench

TINY = ["model.embed_dim=16", "model.depth=2", "model.num_heads=2", "model.local_up_to_layer=1", "run.threads=1"]


def test_rows_per_task_count_and_precision(capsys):
    assert cli.main(["bench", "dytox/digits-b0inc2", *TINY, "--tasks", "1,5", "--precision", "fp32,bf16",
                     "--steps", "1", "--warmup", "0", "--batch", "4"]) == 0
    out = capsys.readouterr()
    table = [line for line in out.out.splitlines() if line.startswith("| ") and not line.startswith("| tasks")]
    assert [row.split(" | ")[:3] for row in table] == [["| 1", "2", "fp32"], ["| 1", "2", "bf16"],
                                                       ["| 5", "10", "fp32"], ["| 5", "10", "bf16"]]
    assert all(float(row.split(" | ")[4].replace(",", "")) > 0 for row in table)
    assert out.err.count("# ") == 4  # a line per row as it is measured


def test_the_increment_shrinks_to_reach_the_task_count():
    cfg, scenario = bench_config(["dytox/digits-b0inc2"], [], 10)  # 5 tasks of 2 -> 10 tasks of 1
    assert len(scenario) == 10 and cfg.data.increment == 1
    _, scenario = bench_config(["dytox/digits-b0inc2"], [], 3)  # enough tasks already: the preset's own
    assert len(scenario) == 5


def test_the_rehearsal_batch_rides_along():
    rows, table = run_bench(["er/digits-b0inc2"], ["model.width=8", "run.threads=1", "method.memory_batch=3"], [2],
                            ["fp32"], [False], 4, 1, 0, say=lambda _: None)
    assert rows[0].tasks == 2 and rows[0].memory_batch == 3 and "| 2 | 4 | fp32 | off |" in table


@pytest.mark.parametrize("args, expected", [
    (["--tasks", "1,x"], "--tasks: expected task counts"),
    (["--tasks", "11"], "11 tasks need at least 11 classes"),
    (["--precision", "fp16"], "--precision: expected fp32 or bf16"),
])
def test_bad_arguments_are_one_line(capsys, args, expected):
    assert cli.main(["bench", "dytox/digits-b0inc2", *TINY, *args, "--steps", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


def test_the_epoch_script_times_a_real_epoch(tmp_path, capsys):
    """benchmarks/gpu/epoch_time.py on a tiny model: its generated CIFAR-100 pickles go through the real reader
    and pipeline, and its table holds the trainer's per-epoch figures."""
    import importlib.util
    from pathlib import Path


    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "epoch_time.py"
    spec = importlib.util.spec_from_file_location("epoch_time", path)
    epoch_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(epoch_time)
    root = epoch_time.write_random_cifar100(tmp_path / "data", 300)
    assert epoch_time.main(["--data-root", str(root), "--epochs", "2", "--variants", "published",
                            "--out", str(tmp_path / "runs"), *TINY, "train.batch_size=32",
                            "run.progress=false"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| published"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["fp32", "off"] and int(cells[3].replace(",", "")) > 0 and float(cells[6].replace(",", "")) > 0
    steps = (tmp_path / "runs" / "run0" / "steps.csv").read_text().splitlines()
    assert len(steps) == 3  # a header and the two epochs


def test_a_regenerated_section_keeps_its_reading(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import report

    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n\n## A\n\n| old |\n\nReading: what it means.\n\nMore reading.\n\n## B\n\nb\n")
    monkeypatch.setattr(report, "BENCHMARKS", page)
    report.update_section("A", "| new |")
    report.update_section("C", "c")
    assert page.read_text() == ("# Benchmarks\n\n## A\n\n| new |\n\nReading: what it means.\n\nMore reading.\n"
                                "\n## B\n\nb\n\n## C\n\nc\n")


# the methods whose phase draws a separate rehearsal batch, which reads the memory's stored extras for some
DRAWS_A_MEMORY_BATCH = {"er", "dark-er", "dark-er-pp", "agem", "fdr", "gss", "hal", "lvt", "gem"}
# the methods that train in the first task only (their later tasks update prototypes or statistics)
FIRST_TASK_ONLY = {"aper", "ranpac", "simplecil"}


@pytest.mark.parametrize("method", sorted(TINY_METHODS))
def test_every_method_benches_a_real_step(method):
    """After one task learned on random images (memory update, consolidation), a step of the second task runs the
    method's whole step; the rehearsal batch comes from the memory, with the extras stored with its rows."""
    preset, tiny = tiny_method(method)
    rows, _ = run_bench([preset], [*tiny, "data.increment=5", "run.threads=1"], [2], ["fp32"], [False], 4, 1, 0,
                        say=lambda _: None)
    row = rows[0]
    assert row.tasks == 2 and row.infer_images_per_s > 0
    assert row.train_images_per_s is None if method in FIRST_TASK_ONLY else row.train_images_per_s > 0
    assert (row.memory_batch > 0) == (method in DRAWS_A_MEMORY_BATCH)
