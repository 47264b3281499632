"""Parameters of the pretrained-ViT presets on ViT-B/16 (`vitcl params`, no weights needed): total and trainable
after the first task, trainable in later tasks, and the growth over the 20 tasks of CIFAR-100 B0 Inc5.

    PYTHONPATH=src python benchmarks/pretrained_params.py [--write]

Total counts what a method keeps to predict (backbone, its modules, prompts, keys, heads, prototypes or the
classifier's matrices); trainable what its optimiser updates in that task. Each method's docs/methods page
itemises its count.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from pretrained_rows import PRETRAINED_METHODS, with_variants
from report import ROOT, update_section

PRESET = "{}/cifar100-b0inc5-vitb16in21k"


def counts(method: str, options: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "vitcl", "params", "--json", PRESET.format(method), "model.pretrained=null", *options]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")}).stdout
    return json.loads(out)


def table() -> str:
    lines = ["| preset | total after task 1 | trainable in task 1 | trainable in tasks 2-20 | total after task 20 "
             "| growth per task |", "|---|---|---|---|---|---|"]
    for _, method, options in with_variants(PRETRAINED_METHODS):
        rows = counts(method, options)
        later = sorted({int(r["trainable"]) for r in rows[1:]})
        later_cell = f"{later[0]:,}" if len(later) == 1 else f"{later[0]:,} to {later[-1]:,}"
        growth = (rows[-1]["total"] - rows[0]["total"]) / (len(rows) - 1)
        label = f"`{PRESET.format(method)}`" + "".join(f" {o.removeprefix('method.')}" for o in options)
        lines.append(f"| {label} | {int(rows[0]['total']):,} | {int(rows[0]['trainable']):,} | {later_cell} "
                     f"| {int(rows[-1]['total']):,} | {growth:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="rewrite the section of BENCHMARKS.md")
    args = ap.parse_args()
    body = table()
    print(body)
    if args.write:
        update_section("Parameters of the pretrained-ViT presets on ViT-B/16 (CIFAR-100 B0 Inc5)",
                       f"{__doc__.split(chr(10) + chr(10), 1)[1] if __doc__ else ''}\n{body}\n")


if __name__ == "__main__":
    main()
