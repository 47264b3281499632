"""The `published` section: the cell a reproduction preset aims at, validated, carried into results.json and
printed beside the measured values."""
import json
from types import SimpleNamespace

import pytest

from test_param_table import CASES
from vitcl.cli import main
from vitcl.config import PublishedConfig
from vitcl.errors import ConfigError
from vitcl.eval.jsonfile import dumps
from vitcl.eval.report import build_results, comparison_table, measured, published_rows, summary_table
from vitcl.runconfig import load_config, load_source, preset_names


@pytest.mark.parametrize("override,message", [
    ("published.values.accuracy=3", "published.values.accuracy: unknown metric"),
    ("published.values.avg=high", "published.values.avg: expected a finite number"),
    ("published.std.last=0.3", "published.std.last: a std without a published value"),
    ("published.table=1", "published.table: unknown key"),
])
def test_bad_published_entries_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(["finetune/digits-b0inc2"], [override])


def test_every_published_preset_loads_and_names_its_cell():
    named = [n for n in preset_names() if (load_source(n).get("published") or {}).get("values")]
    assert len(named) >= 57
    for name in named:
        pub = load_config([name])[0].published
        assert pub.source and pub.row and pub.column, name


def test_published_parameter_counts_are_the_tables():
    """The presets' published #P and the parameter table the counts are tested against are the same numbers."""
    assert len(CASES) >= 56
    for preset, (params, _) in CASES:
        assert load_config([preset])[0].published.values["params_m"] == params, preset


def test_a_preset_built_on_another_does_not_inherit_its_cell():
    assert load_config(["lpa/cifar100-b50inc10"])[0].published.values["last"] == 68.52
    assert load_config(["lpa/cifar100-b50inc10-lambda-0.1"])[0].published.values == {}
    overlaid = load_config(["dytox/cifar100-b0inc10-global", "overlays/dytox-fixes"])[0]
    assert overlaid.published.values["avg"] == 67.33  # an overlay stacked on the command line keeps the target


def _results(published: PublishedConfig) -> dict:
    cfg = SimpleNamespace(method=SimpleNamespace(name="m"), model=SimpleNamespace(name="vit"),
                          data=SimpleNamespace(dataset="digits", datasets=[]), published=published)
    class Scenario(list):
        increments = [2, 2]

        def describe(self):
            return "2 tasks"

    scenario = Scenario([0, 1])
    evals = [{"class_il": [80.0], "task_il": [80.0], "seen_class_il": 80.0, "seen_task_il": 80.0,
              "class_il_topk": [100.0], "seen_class_il_topk": 100.0},
             {"class_il": [50.0, 90.0], "task_il": [70.0, 95.0], "seen_class_il": 70.0, "seen_task_il": 82.5,
              "class_il_topk": [99.0, 100.0], "seen_class_il_topk": 99.5}]
    tasks = [{"params": 1_000_000, "seconds": 1.0}, {"params": 1_500_000, "seconds": 1.0}]
    return build_results(cfg, scenario, evals, tasks, None)


def test_measured_values_and_differences():
    pub = PublishedConfig("Paper, Table 1", "M", "2 steps",
                          {"avg": 74.0, "last": 71.0, "forgetting": 25.0, "last_top5": 99.0, "task_il_avg": 80.0,
                           "params_m": 1.5}, {"avg": 0.1})
    r = _results(pub)
    assert r["published"]["values"]["avg"] == 74.0 and r["published"]["std"] == {"avg": 0.1}
    got = {m: (value, mine, diff) for m, value, mine, diff in published_rows(r)}
    assert got["avg"][1] == pytest.approx(75.0) and got["avg"][2] == pytest.approx(1.0)  # (80 + 70) / 2
    assert got["last"][1:] == (70.0, -1.0)
    assert got["forgetting"][1] == pytest.approx(30.0)  # 80 -> 50 on task 0
    assert got["last_top5"][1] == 99.5 and got["params_m"][1] == 1.5
    assert got["task_il_avg"][1] == pytest.approx((80.0 + 82.5) / 2)
    assert measured({"class_il": None, "task_il": None}, "avg") is None
    text = summary_table(r)
    assert "published: Paper, Table 1, M, 2 steps" in text and "measured 70.00 (-1.00)" in text
    assert json.loads(dumps(r))["published"] == r["published"]  # strict JSON


def test_report_prints_the_published_cells(tmp_path):
    r = _results(PublishedConfig("Paper, Table 1", "M", "2 steps", {"last": 71.0}))
    run = tmp_path / "run-a"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(r))
    table = comparison_table([run])
    assert "| run-a | Paper, Table 1, M, 2 steps | last | 71.00 | 70.00 | -1.00 |" in table
    r.pop("published")
    (run / "results.json").write_text(json.dumps(r))
    assert "published cell" not in comparison_table([run])


def test_presets_cli_lists_the_published_cells(capsys):
    assert main(["presets", "--published"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["lpa/cifar100-b10inc10"].endswith("last 65.27, avg 76.5, forgetting 11.2")
    assert lines["finetune/digits-b0inc2"] == "-"


def test_presets_cli_keeps_the_names_with_every_term(capsys):
    assert main(["presets", "lvt", "fashion"]) == 0
    assert capsys.readouterr().out.split() == ["lvt/fashion-mnist-b0inc2"]
    assert main(["presets", "dytox/", "imagenet1000", "--published"]) == 0
    assert capsys.readouterr().out.startswith("dytox/imagenet1000-b0inc100: DyTox erratum")
    assert main(["presets", "lvt", "imagenet1000"]) == 2
    assert "no preset name contains 'lvt' and 'imagenet1000'" in capsys.readouterr().err
