"""The rows of DyTox's tables on Fashion-MNIST: every class-incremental method of vitcl on the same protocol, on
a small ResNet-18 and on a small ViT where the method allows, with the same data, memory and training budget.

    PYTHONPATH=src python benchmarks/fmnist_cil_table.py [--seeds 0,1] [--methods icarl,wa,...]
        [--backbones resnet,vit] [--out /tmp/fmnist-cil] [key=value ...]

Protocol: Fashion-MNIST padded to 32x32, B0 with 5 tasks of 2 classes (class order 0..9), the first 300 training
and 300 test images of each class, crop (pad 4) + flip; memory 200 in total with herding (none for finetune, LwF,
EWC; joint trains on all seen data). Every row trains 8 epochs per task at batch 32, AdamW lr 1e-3, weight decay
1e-4, 1 warm-up epoch, cosine to 1e-5: 19 optimiser steps per epoch on a task's own 600 images, 25 with the
memory of 200 beside them (joint: 19 per seen task). The post-hoc phases some methods add run on top, each 5
epochs: DyTox's and PODNet's finetuning on the memory, E2E's balanced finetuning, BiC's bias correction, DER's
classifier retraining (its own SGD at lr 0.1, x 0.1 after 3 epochs, as the authors' code). Backbones: ResNet-18
of width 16 with the CIFAR stem (base/small-resnet18) and the 4-block ViT of base/small-vit-32 (16 tokens of
8x8 px, dim 64); DyTox brings its own ConViT of the same width (2 SABs + 1 TAB). The CPU column is the CPU time
of the run's process (one torch thread), not the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from report import ROOT, machine

COMMON = ["data.train_per_class=300", "data.test_per_class=300", "memory.size=200", "memory.selection=herding",
          "train.epochs=8", "train.batch_size=32", "train.optimizer=adamw", "train.lr=1e-3",
          "train.weight_decay=1e-4", "train.warmup_epochs=1", "train.schedule=cosine", "train.min_lr=1e-5",
          "eval.batch_size=500", "run.threads=1", "run.progress=false"]
RESNET = ["model.name=resnet18", "model.stem=cifar", "model.width=16"]
VIT = ["model.name=vit", "model.patch_size=8", "model.embed_dim=64", "model.depth=4", "model.num_heads=4",
       "model.mlp_ratio=2.0", "model.pool=mean"]
CONVIT = ["model.name=convit", "model.patch_size=8", "model.embed_dim=64", "model.depth=3",
          "model.local_up_to_layer=2", "model.num_heads=4", "model.mlp_ratio=2.0", "model.drop_path=0.0"]
# method -> (its overrides, the backbones it runs on)
METHODS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "finetune": (["memory.size=0"], ("resnet", "vit")),
    "joint": (["memory.size=0"], ("resnet", "vit")),
    "replay": ([], ("resnet", "vit")),
    "lwf": (["memory.size=0"], ("resnet", "vit")),
    "ewc": (["memory.size=0"], ("resnet", "vit")),
    "icarl": ([], ("resnet", "vit")),
    "ucir": (["model.last_relu=false"], ("resnet",)),
    "bic": (["method.bias_epochs=5"], ("resnet", "vit")),
    "wa": ([], ("resnet", "vit")),
    "podnet": (["method.finetune_epochs=5", "method.finetune_lr=1e-4"], ("resnet",)),
    "der": (["method.retrain_epochs=5", "method.retrain_milestones=[3]"], ("resnet", "vit")),  # its own SGD, lr 0.1
    "e2e": (["method.finetune_epochs=5", "method.finetune_lr=2e-4"], ("resnet", "vit")),
    "dytox": (["method.finetune_epochs=5", "method.finetune_lr=2e-4"], ("convit",)),
}
BACKBONES = {"resnet": RESNET, "vit": VIT, "convit": CONVIT}


def run(name: str, overrides: list[str], out: Path) -> tuple[dict, float]:
    """One run in a child process: its results.json and the child's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, "-m", "vitcl", "run", "-q", "data/fashion-mnist-b0inc2", *overrides,
           f"run.out_dir={out}", f"run.name={name}"]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads((out / name / "results.json").read_text()), cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--backbones", default="resnet,vit,convit")
    ap.add_argument("--out", default="/tmp/fmnist-cil")
    args, extra = ap.parse_known_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for method in args.methods.split(","):
        own, backbones = METHODS[method]
        for bb in backbones:
            if bb not in args.backbones.split(","):
                continue
            results = []
            for seed in seeds:
                name = f"{method}-{bb}-seed{seed}"
                overrides = [f"method.name={method}", *COMMON, *BACKBONES[bb], *own, f"run.seed={seed}", *extra]
                if (out / name / "results.json").exists():
                    r = json.loads((out / name / "results.json").read_text())
                    cpu = float(json.loads((out / name / "cpu.json").read_text())["seconds"])
                else:
                    r, cpu = run(name, overrides, out)
                    (out / name / "cpu.json").write_text(json.dumps({"seconds": cpu}))
                results.append((r, cpu))
                print(f"# {name}: CIL Avg {r['class_il']['avg_incremental']:.2f} Last {r['class_il']['last']:.2f}"
                      f" ({cpu:.0f} s CPU)", flush=True)
            rows.append((method, bb, results))
    print(f"machine: {machine()}; seeds {args.seeds}")
    print("| method | backbone | CIL Avg | CIL Last | CIL forgetting | TIL Avg | #P final | CPU (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for method, bb, results in rows:
        params = int(results[0][0]["params"]["final"])
        cpu = statistics.mean(c for _, c in results)
        print(f"| {method} | {bb} | {cell(results, 'class_il', 'avg_incremental')} "
              f"| {cell(results, 'class_il', 'last')} | {cell(results, 'class_il', 'forgetting')} "
              f"| {cell(results, 'task_il', 'avg_incremental')} | {params:,} | {cpu:.0f} |")


def cell(results: list[tuple[dict, float]], section: str, key: str) -> str:
    """Mean ± standard deviation over the seeds (population std, as the papers' ±)."""
    values = [r[section][key] for r, _ in results]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}"


if __name__ == "__main__":
    main()
