"""The DyTox CIFAR-100 B0-10 reproduction (DyTox erratum: Avg 71.50, Last 57.76, mean over the three class
orders) as one sweep, then its row of docs/reproductions.md. Needs a GPU (or two, as the published runs used:
the preset's memory is per rank) and CIFAR-100's python pickles under data.root.

    python benchmarks/gpu/dytox_cifar100_b0inc10.py /data/cifar100 [--gpus 0,1] [--out runs/dytox-b0inc10]

With --gpus 0,1 the three orders run one per GPU at a time (vitcl sweep --launcher local); a stopped sweep is
continued by running the same command again (vitcl sweep --resume).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from vitcl import cli  # noqa: E402

PRESET = "dytox/cifar100-b0inc10"
ORDERS = "data.class_order=cifar100-order1,cifar100-order2,cifar100-order3"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_root", help="folder holding cifar-100-python/")
    p.add_argument("--gpus", default=None, help="run one order per GPU at a time, e.g. 0,1,2")
    p.add_argument("--out", default=str(ROOT / "runs" / "dytox-cifar100-b0inc10"))
    args = p.parse_args(argv)
    launcher = ["--launcher", "local", "--gpus", args.gpus] if args.gpus else []
    if (Path(args.out) / "sweep.yaml").exists():
        rc = cli.main(["sweep", "--resume", args.out, *launcher])
    else:
        rc = cli.main(["sweep", PRESET, f"data.root={args.data_root}", "--grid", ORDERS, "--out", args.out,
                       *launcher])
    if rc:
        return rc
    cli.main(["report", args.out])
    import reproductions

    return reproductions.main(["--runs", args.out])


if __name__ == "__main__":
    sys.exit(main())
