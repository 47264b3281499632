"""Locality across tasks (LPA, Zheng et al. 2023) on Fashion-MNIST B2-2: joint training, LPA's baseline and the
baseline w/LPA (LPSA in every self-attention block). Each run records, after every task, the non-locality of each
layer on a fixed held-out batch (eval.analyses); this script plots them side by side and writes the section of
BENCHMARKS.md with the runs' Avg / Last / Forgetting.

    python benchmarks/lpa_locality.py [key=value ...]      # overrides apply to all three runs
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from report import ROOT, fmt, machine, run_preset, update_section

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "lpa-locality"
RUNS = (("joint", "joint"), ("baseline", "baseline"), ("lpa", "baseline w/LPA"))


def main(overrides: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from vitcl.eval.locality import plot_nonlocality

    out = Path(tempfile.mkdtemp(prefix="vitcl-lpa-"))
    summaries, rows, nl_rows = {}, [], []
    for name, label in RUNS:
        res, wall = run_preset(str(CONFIGS / "common.yaml"), out, name, [str(CONFIGS / f"{name}.yaml"), *overrides])
        loc = json.loads((out / name / "analysis" / "locality.json").read_text())
        summaries[label] = loc
        cil = res["class_il"]
        rows.append(f"| {label} | {fmt(cil['avg_incremental'])} | {fmt(cil['last'])} | {fmt(cil['forgetting'])} "
                    f"| {res['params']['final'] / 1e3:.1f}k | {wall:.0f} |")
        for t, per_layer in zip(loc["tasks"], loc["nonlocality"]):
            nl_rows.append(f"| {label} | {t + 1} | " + " | ".join(f"{d:.3f}" for d in per_layer) + " |")
        shutil.copy(out / name / "plots" / f"attention_task_{loc['tasks'][-1]}.png",
                    HERE / f"lpa_attention_{name}.png")
    plot = plot_nonlocality(summaries, HERE / "lpa_nonlocality.png")
    layers = len(next(iter(summaries.values()))["layers"])
    cmd = "python benchmarks/lpa_locality.py" + "".join(f" {o}" for o in overrides)
    body = f"""Command: `{cmd}` (configs in `benchmarks/lpa-locality/`: Fashion-MNIST padded to 32x32, B2-2 = 5 tasks
of 2 classes, 300 training images per class (300 test images per class), a ConViT with 3 self-attention blocks + 1 class-attention block, dim
64, 4 heads, 8x8 patches (a 4x4 grid), 6 epochs per task, no MixUp; baseline and w/LPA: memory 200 by herding,
distillation on memory samples, 4 finetuning epochs; joint: the same encoder trained on every seen task's data at
each stage, softmax cross-entropy). Machine: {machine()}, shared with other jobs.

Class-IL accuracy (%) on the seen classes' test images:

| run | Avg | Last | Forgetting | #P final | wall (s) |
|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

Non-locality D = (1/N) sum_ij A_ij ||delta_ij|| (patch units, mean over heads) of each self-attention layer after
each task, on the same 200 held-out test images (all classes) for every run and task; uniform attention on a 4x4
grid gives 2.01, attention to the query patch alone 0. Plot: `benchmarks/{plot.name}` (one panel per run, one line
per layer); attention heat maps after the last task: `benchmarks/lpa_attention_{{joint,baseline,lpa}}.png`.

| run | task | """ + " | ".join(f"layer {i + 1}" for i in range(layers)) + " |\n|---|---|" + "---|" * layers + "\n" + \
        "\n".join(nl_rows) + "\n\n![non-locality per layer across tasks](benchmarks/lpa_nonlocality.png)\n"
    update_section("LPA: locality across tasks on Fashion-MNIST (B2-2)", body)
    print(body)


if __name__ == "__main__":
    main(sys.argv[1:])
