"""Finetune, replay and joint on Fashion-MNIST (B0, 5 tasks of 2 classes): Avg / Last / Forgetting, time per task
and images/s, written to BENCHMARKS.md.

    python benchmarks/baselines.py [key=value ...]      # overrides apply to all three runs
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from report import fmt, machine, run_preset, update_section

METHODS = ("finetune", "replay", "joint")


def main(overrides: list[str]) -> None:
    out = Path(tempfile.mkdtemp(prefix="vitcl-bench-"))
    rows = []
    for method in METHODS:
        res, wall = run_preset(f"{method}/fashion-mnist-b0inc2", out, method, overrides)
        cil = res["class_il"]
        secs = [t["seconds"] for t in res["tasks"]]
        ips = sum(t["images"] for t in res["tasks"]) / sum(secs)
        rows.append(f"| {method} | {fmt(cil['avg_incremental'])} | {fmt(cil['last'])} | {fmt(cil['forgetting'])} "
                    f"| {fmt(res['task_il']['avg_incremental'])} | {' / '.join(f'{s:.0f}' for s in secs)} "
                    f"| {ips:,.0f} | {wall:.0f} |")
    cmd = "python benchmarks/baselines.py" + "".join(f" {o}" for o in overrides)
    body = f"""Command: `{cmd}` (presets `finetune|replay|joint/fashion-mnist-b0inc2`; see each preset for the model,
recipe and memory budget). Machine: {machine()}. Class-IL accuracy in %, Fashion-MNIST test set of the seen
classes; task-IL from the same evaluation pass.

| method | CIL Avg | CIL Last | CIL Forgetting | TIL Avg | seconds per task | train images/s | wall (s) |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows)
    update_section("Baselines on Fashion-MNIST (B0, 5 tasks of 2 classes)", body)
    print(body)


if __name__ == "__main__":
    main(sys.argv[1:])
