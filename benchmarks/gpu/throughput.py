"""The five-minute throughput check: `vitcl bench dytox/cifar100-b0inc10` (DyTox's CIFAR-100 model; 50 tasks of 2
classes for the 50-task row) after 1, 10 and 50 tasks, fp32 and bf16, with torch.compile off and on, on whatever
device there is (src/vitcl/bench.py says what a step holds). Run it whenever a GPU is at hand:

    PYTHONPATH=src python benchmarks/gpu/throughput.py [--tasks 1,10,50] [--precision fp32,bf16]
        [--compile both] [--steps 10] [--warmup 3] [--batch 128] [--write] [key=value ...]

`--write` puts the table in BENCHMARKS.md under "Training throughput on <device>".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import device_name, machine, update_section  # noqa: E402

from vitcl.bench import run_bench  # noqa: E402

PRESET = "dytox/cifar100-b0inc10"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="1,10,50")
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--compile", default="both", choices=["off", "on", "both"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--write", action="store_true")
    args, overrides = ap.parse_known_args()
    modes = [False, True] if args.compile == "both" else [args.compile == "on"]
    _, table = run_bench([PRESET], overrides, [int(t) for t in args.tasks.split(",")], args.precision.split(","),
                         modes, args.batch, args.steps, args.warmup, say=lambda line: print(line, flush=True))
    body = (f"`python benchmarks/gpu/throughput.py --steps {args.steps} --warmup {args.warmup} --batch {args.batch}"
            f"{' ' + ' '.join(overrides) if overrides else ''}` (`vitcl bench {PRESET}`) on {machine()}, random "
            f"32x32 images.\n\n{table}")
    print("\n" + body)
    if args.write:
        update_section(f"Training throughput on {device_name()}", body)


if __name__ == "__main__":
    main()
