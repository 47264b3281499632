"""DyTox and DyTox+ against replay and finetune on Fashion-MNIST (padded to 32x32, B0, 5 tasks of 2 classes).

Every method gets the same small ConViT (4x4 patches, dim 64, 2 GPSA SABs + 1 class-attention block, 4 heads;
replay and finetune use its single class token with one linear head per task), the same training recipe, the
same data subset (the first images of each class) and the same rehearsal memory (200 exemplars in total,
herding; none for finetune). DyTox adds its finetuning phase on the memory after every task t >= 1 (counted in
its time).

    PYTHONPATH=src python benchmarks/fmnist_dytox_compare.py [--per-class 300] [--epochs 10] [--test-per-class 300]
        [--threads 1] [--out /tmp/fmnist-dytox]

Reads the IDX files of Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist); when no
fashion-mnist reader is registered, a minimal one is defined here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from vitcl import cli

METHODS = {
    "finetune": ["method.name=finetune", "memory.size=0"],
    "replay": ["method.name=replay"],
    "dytox": ["method.name=dytox", "method.finetune_epochs=10", "method.finetune_lr=2e-4"],
    "dytox-plus": ["method.name=dytox-plus", "method.finetune_epochs=10", "method.finetune_lr=2e-4",
                   "data.augment.mixup_alpha=0.8", "data.augment.label_smoothing=0.1"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--test-per-class", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default="/tmp/fmnist-dytox")
    args = ap.parse_args()
    common = common_overrides(args)
    rows = []
    for name in args.methods.split(","):
        rows.append(run(name, ["data/fashion-mnist-b0inc2"], common + METHODS[name], args.out))
    print_table(rows, args)


def common_overrides(args) -> list[str]:
    """The small ConViT, the recipe and the data budget every row shares."""
    return ["model.name=convit", "model.patch_size=4", "model.embed_dim=64", "model.depth=3",
            "model.local_up_to_layer=2", "model.num_heads=4", "model.mlp_ratio=2.0", "model.drop_path=0.0",
            f"data.train_per_class={args.per_class}", f"data.test_per_class={args.test_per_class}",
            "memory.size=200", "memory.selection=herding",
            f"train.epochs={args.epochs}", "train.batch_size=32", "train.optimizer=adamw", "train.lr=2e-3",
            "train.weight_decay=1e-6", "train.warmup_epochs=1", "train.min_lr=1e-5", "eval.batch_size=500",
            f"run.threads={args.threads}", "run.progress=false", f"run.out_dir={args.out}"]


def run(name: str, sources: list[str], overrides: list[str], out: str) -> tuple[str, dict, float]:
    """One run into OUT/name: (name, its results.json, wall seconds)."""
    t0 = time.perf_counter()
    code = cli.main(["run", "-q", *sources, *overrides, f"run.name={name}"])
    seconds = time.perf_counter() - t0
    assert code == 0, f"{name}: exit {code}"
    r = json.loads((Path(out) / name / "results.json").read_text())
    print(f"# {name}: done in {seconds:.0f}s", flush=True)
    return name, r, seconds


def print_table(rows: list[tuple[str, dict, float]], args) -> None:
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"budget: {args.per_class} training images per class, {args.epochs} epochs per task, batch 32, "
          f"memory 200 (herding), {args.test_per_class} test images per class")
    print("| method | CIL Avg | CIL Last | CIL forgetting | TIL Avg | TIL Last | #P final | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r, s in rows:
        c, t = r["class_il"], r["task_il"]
        print(f"| {name} | {c['avg_incremental']:.2f} | {c['last']:.2f} | {c['forgetting']:.2f} | "
              f"{t['avg_incremental']:.2f} | {t['last']:.2f} | {int(r['params']['final']):,} | {s:.0f} |")


if __name__ == "__main__":
    main()
