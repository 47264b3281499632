"""The rows of LVT's tables on Fashion-MNIST: the rehearsal methods LVT compares against (ER, GEM, A-GEM, iCaRL, FDR,
GSS, HAL, DER, DER++) beside LVT, replay and finetune, at memory 200 and 500; then ER on each transformer backbone
at an equal parameter count, to see whether the transformers forget more than the ResNet.

    PYTHONPATH=src python benchmarks/fmnist_lvt_rows.py [--seeds 0,1] [--memories 200,500] [--jobs 2]
        [--methods er,gem,...] [--backbones vit,levit,coat,cvt,cct] [--out /tmp/fmnist-lvt] [key=value ...]

Protocol (LVT's offline recipe of `lvt/fashion-mnist-b0inc2`): Fashion-MNIST padded to 32x32, B0 with 5 tasks of 2
classes in the natural class order, the first 300 training and 300 test images of each class, crop (pad 4) +
flip; SGD (lr 0.01, momentum 0.9, no weight decay, constant lr), batch 32, 5 epochs per task. Every row runs its
own `<method>/fashion-mnist-b0inc2` preset (the method's options at its paper's values) with this protocol on top.
The methods that rehearse through a memory batch (ER, DER, DER++, GSS, A-GEM, FDR, HAL, LVT) take 19 steps per epoch
on the task's 600 images, each with a memory batch of 32; replay and iCaRL train on the task's images and the
memory together (25 steps at memory 200, 35 at 500); GEM computes its constraints on its whole memory, augmented
at every step. The rehearsal rows train a ResNet-18 of width 16 with the CIFAR stem (`base/small-resnet18`); LVT its
small LVT. The backbone rows run the `er/fashion-mnist-b0inc2-<backbone>` presets (ER at memory 200, reservoir),
whose backbones have the ResNet's parameter count within 5% (`base/<backbone>-fmnist-0.7m`; LeViT and CoaT need
`pip install 'vitcl[timm]'` and a torchvision that imports). CPU: seconds of CPU time of the run's process, one
torch thread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from report import ROOT, machine, update_section

PROTOCOL = ["data.train_per_class=300", "data.test_per_class=300", "train.epochs=5", "train.batch_size=32",
            "train.optimizer=sgd", "train.lr=0.01", "train.momentum=0.9", "train.weight_decay=0.0",
            "train.schedule=constant", "train.warmup_epochs=0", "train.min_lr=0.0", "eval.batch_size=500",
            "run.threads=1", "run.progress=false"]
RESNET = ["model.name=resnet18", "model.stem=cifar", "model.width=16"]
REHEARSAL = ("er", "gem", "agem", "icarl", "fdr", "gss", "hal", "dark-er", "dark-er-pp", "lvt", "replay")
BACKBONES = ("vit", "levit", "coat", "cvt", "cct")


def run(job: tuple[str, str, list[str], Path]) -> tuple[dict, float]:
    """One run in a child process: its results.json and the child's CPU seconds (cached in the run folder)."""
    name, preset, overrides, out = job
    folder = out / name
    if (folder / "results.json").exists() and (folder / "cpu.json").exists():
        return (json.loads((folder / "results.json").read_text()),
                float(json.loads((folder / "cpu.json").read_text())["seconds"]))
    args = ["vitcl", "run", "-q", preset, *overrides, f"run.out_dir={out}", f"run.name={name}"]
    # the child's CPU time from its own rusage (the parent runs several children at once)
    # LeViT and CoaT are timm's: where torchvision does not import (PyPI's CUDA build next to CPU torch), timm
    # imports with the tests' stand-in in its place, as the test suite does
    standin = (f"sys.path.insert(0, {str(ROOT / 'tests')!r}); import torchvision_standin; "
               "torchvision_standin.timm_importable(); ") if preset.endswith(("-levit", "-coat")) else ""
    wrapper = ("import resource, runpy, sys, json; sys.argv = sys.argv[1:]; " + standin +
               "code = 0\ntry:\n    runpy.run_module('vitcl', run_name='__main__')\n"
               "except SystemExit as e:\n    code = e.code or 0\n"
               "u = resource.getrusage(resource.RUSAGE_SELF)\n"
               f"open({str(folder / 'cpu.json')!r}, 'w').write(json.dumps({{'seconds': u.ru_utime + u.ru_stime}}))\n"
               "sys.exit(code)")
    subprocess.run([sys.executable, "-c", wrapper, *args], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"})
    return run(job)


def cell(results: list[tuple[dict, float]], section: str, key: str) -> str:
    """Mean ± standard deviation over the seeds (population std, as the other Fashion-MNIST tables)."""
    values = [r[section][key] for r, _ in results]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}"


def table(rows: list[tuple[str, str, str, list[tuple[dict, float]]]]) -> str:
    lines = ["| method | backbone | memory | CIL Avg | CIL Last | CIL forgetting | TIL Avg | TIL Last | #P | CPU (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, bb, mem, results in rows:
        params = int(results[0][0]["params"]["final"])
        cpu = statistics.mean(c for _, c in results)
        lines.append(f"| {method} | {bb} | {mem} | {cell(results, 'class_il', 'avg_incremental')} "
                     f"| {cell(results, 'class_il', 'last')} | {cell(results, 'class_il', 'forgetting')} "
                     f"| {cell(results, 'task_il', 'avg_incremental')} | {cell(results, 'task_il', 'last')} "
                     f"| {params:,} | {cpu:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--memories", default="200,500")
    ap.add_argument("--methods", default=",".join(("finetune",) + REHEARSAL))
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="/tmp/fmnist-lvt")
    ap.add_argument("--write", action="store_true", help="rewrite the section of BENCHMARKS.md")
    args, extra = ap.parse_known_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    groups: list[tuple[str, str, str, list[tuple[str, str, list[str], Path]]]] = []
    for method in [m for m in args.methods.split(",") if m]:
        memories = ["0"] if method == "finetune" else args.memories.split(",")
        own = ROOT / "src" / "vitcl" / "configs" / method / "fashion-mnist-b0inc2.yaml"
        preset = f"{method}/fashion-mnist-b0inc2" if own.exists() else "replay/fashion-mnist-b0inc2"
        model = [] if method == "lvt" else RESNET
        for mem in memories:
            jobs = [(f"{method}-m{mem}-seed{s}", preset,
                     [f"method.name={method}", *PROTOCOL, *model, f"memory.size={mem}", f"run.seed={s}", *extra], out)
                    for s in seeds]
            groups.append((method, "lvt" if method == "lvt" else "resnet18", mem, jobs))
    for bb in [b for b in args.backbones.split(",") if b]:
        jobs = [(f"er-{bb}-m200-seed{s}", f"er/fashion-mnist-b0inc2-{bb}",
                 [*PROTOCOL, f"run.seed={s}", *extra], out) for s in seeds]
        groups.append(("er", bb, "200", jobs))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [(m, bb, mem, [pool.submit(run, job) for job in jobs]) for m, bb, mem, jobs in groups]
        rows = [(m, bb, mem, [f.result() for f in fs]) for m, bb, mem, fs in futures]
    body = table(rows)
    print(f"machine: {machine()}; seeds {args.seeds}\n\n{body}")
    if args.write:
        update_section("The rows of LVT's tables on Fashion-MNIST (B0, 5 tasks of 2 classes, memory 200 and 500)",
                       f"{__doc__.split(chr(10) + chr(10), 1)[1] if __doc__ else ''}\nMachine: {machine()}. "
                       f"Seeds {args.seeds}; mean ± population std.\n\n{body}\n")


if __name__ == "__main__":
    main()
