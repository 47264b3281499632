"""LVT beside replay and finetune on Fashion-MNIST (B0, 5 tasks of 2 classes, memory 200), plus two ablations
(no attention consolidation L_a; a single classifier), all on the same small LVT backbone, recipe and budget.
Writes its section of BENCHMARKS.md.

    python benchmarks/lvt_fashion_mnist.py [key=value ...]    # overrides apply to every run

The preset keeps it CPU-sized (300 training and 300 test images per class, 5 epochs per task); each run uses one
torch thread, and every configuration runs with seeds 0 and 1 (the table shows their mean ± half their
difference).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from report import machine, run_preset, update_section

PRESET = "lvt/fashion-mnist-b0inc2"
COMMON = ["run.threads=1"]
SEEDS = (0, 1)
METRICS = [("class_il", "avg_incremental"), ("class_il", "last"), ("class_il", "forgetting"),
           ("task_il", "avg_incremental"), ("task_il", "last"), ("task_il", "forgetting")]
RUNS = [  # (label, overrides on top of the LVT preset)
    ("LVT", []),
    ("LVT without L_a (γ = 0)", ["method.gamma=0"]),
    ("LVT with a single classifier", ["method.dual=false"]),
    ("replay (herding, memory mixed into the batches)", ["method.name=replay", "memory.selection=herding"]),
    ("finetune (no memory)", ["method.name=finetune", "memory.size=0"]),
]


def pm(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.1f} ± {(max(values) - min(values)) / 2:.1f}"


def main(overrides: list[str]) -> None:
    out = Path(tempfile.mkdtemp(prefix="vitcl-lvt-bench-"))
    rows, t_all = [], time.perf_counter()
    for i, (label, extra) in enumerate(RUNS):
        results, secs, walls = [], [], []
        for seed in SEEDS:
            res, wall = run_preset(PRESET, out, f"run{i}-seed{seed}", COMMON + extra + [f"run.seed={seed}"] + overrides)
            results.append(res)
            secs.append(sum(t["seconds"] for t in res["tasks"]))
            walls.append(wall)
        cells = [pm([r[s][k] for r in results]) for s, k in METRICS]
        params = int(results[0]["params"]["final"])
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {params:,} | {sum(secs) / len(secs):.0f} "
                    f"| {sum(walls) / len(walls):.0f} |")
        print(rows[-1], flush=True)
    total = time.perf_counter() - t_all
    cmd = "python benchmarks/lvt_fashion_mnist.py" + "".join(f" {o}" for o in overrides)
    body = f"""Command: `{cmd}` (preset `{PRESET}`; each row changes only what it names). Machine: {machine()};
the machine was shared with other jobs; one torch thread per run, {total / 60:.1f} minutes of wall time for the
{len(RUNS) * len(SEEDS)} runs. Fashion-MNIST padded to 32×32, B0 with 5 tasks of 2 classes in the natural class
order, the first 300 training and 300 test images of each class; memory 200 (fixed total, class-balanced); the small
LVT of `base/lvt-small` (inter-task attention on 8×8 and 4×4 token grids) for every row; SGD with momentum 0.9,
lr 0.01 constant, batch 32, 5 epochs per task. Every cell is the mean over seeds {' and '.join(map(str, SEEDS))} ±
half their difference. Accuracy in %: Avg = mean over the 5 steps of the accuracy on all seen classes, Last = after
the last task, Forg. = forgetting (Chaudhry: mean over old tasks of best minus final accuracy). Class-IL and task-IL
come from one evaluation pass of the same logits (for LVT, its accumulation classifier).

| run | CIL Avg | CIL Last | CIL Forg. | TIL Avg | TIL Last | TIL Forg. | params | train s | wall s |
|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + """

Per step, LVT and its ablations see 32 current images and an independent batch of 32 memory images; replay mixes
the memory into the task's data (600 task images meet 200 exemplars, so about a quarter of its batches' images
come from the memory) and so sees fewer memory images per epoch; finetune has no memory. The parameter count
excludes LVT's injection classifier (training only). How to read the ablations, and why L_a cannot show an effect
in runs this short: docs/methods/lvt.md."""
    update_section("LVT on Fashion-MNIST (B0, 5 tasks of 2 classes, memory 200)", body)
    print(body)


if __name__ == "__main__":
    main(sys.argv[1:])
