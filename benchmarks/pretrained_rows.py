"""Continual learning from a pretrained start at CPU scale: a small ViT pretrained here on one real data set
(scikit-learn's digits, resized to 32x32), then class-incremental Fashion-MNIST (B0, 5 tasks of 2 classes) with the
methods built for pretrained ViTs (SimpleCIL, APER, L2P, DualPrompt, CODA-Prompt, RanPAC, SLCA, EASE) beside DyTox
and finetune from the same weights, and finetune from random weights.

    PYTHONPATH=src python benchmarks/pretrained_rows.py [--seeds 0,1] [--jobs 2] [--methods simplecil,...]
        [--pretrain-epochs 100] [--out /tmp/pretrained-rows] [--write] [key=value ...]

Pretraining: `finetune/digits-b0inc2` as one task of all 10 classes (plain supervised training) on the class-token
small ViT `base/small-vit-32-token` (4 blocks of width 64, 16 patches of 8x8 px, 0.2M parameters), digits resized
to 32x32, crop (pad 4) + flip, AdamW, cosine schedule; its backbone (timm's names) is saved as a checkpoint that every
row loads through `model.pretrained`. Rows: APER with adapters (`aper`), and with `--methods aper-vpt-shallow,
aper-vpt-deep,aper-ssf` its other modules; each method's `<method>/fashion-mnist-b0inc2-pretrained` preset (its
recipe scaled to a few CPU minutes, the method's options at its paper's values scaled to this ViT); finetune:
`finetune/fashion-mnist-b0inc2` on the same ViT; DyTox: `dytox/digits-b0inc2` on Fashion-MNIST with its encoder
made of the pretrained blocks (plain self-attention SABs, one new task-attention block), memory 200 with herding.
Every row: the first 300 training and 300 test images of each class. CPU: seconds of CPU time, one torch thread.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from fmnist_lvt_rows import cell, run
from report import ROOT, machine, update_section

PRETRAINED_METHODS = ("simplecil", "aper", "l2p", "dualprompt", "coda-prompt", "ranpac", "slca", "ease")
# APER's other first-session modules, the same preset with `method.peft` set
VARIANTS = {f"aper-{peft}": ("aper", [f"method.peft={peft}"]) for peft in ("vpt-shallow", "vpt-deep", "ssf")}


def preset_of(name: str) -> tuple[str, list[str]]:
    """The method whose preset a row runs, and the overrides that make it the row."""
    return VARIANTS.get(name, (name, []))


def with_variants(methods) -> list[tuple[str, str, list[str]]]:
    """(row name, method, overrides) for each method, each followed by its variants."""
    rows = []
    for base in methods:
        rows.append((base, *preset_of(base)))
        rows += [(name, of, options) for name, (of, options) in VARIANTS.items() if of == base]
    return rows
DATA = ["data.train_per_class=300", "data.test_per_class=300", "run.threads=1", "run.progress=false"]
VIT = "base/small-vit-32-token"
DYTOX = ["data/fashion-mnist-b0inc2", "model.sab=mhsa", "model.patch_size=8", "model.embed_dim=64",
         "model.depth=5", "model.local_up_to_layer=4", "model.num_heads=4", "model.mlp_ratio=2.0",
         "model.qkv_bias=true"]


def pretrain(out: Path, epochs: int) -> Path:
    """The digits-pretrained small ViT's backbone as a state dict in timm's names (cached)."""
    ckpt = out / "pretrain" / "small-vit-32-digits.pth"
    if ckpt.exists():
        return ckpt
    args = ["-m", "vitcl", "run", "-q", "finetune/digits-b0inc2", VIT, "data.image_size=32", "data.increment=10",
            "data.augment.crop_padding=4", "data.augment.hflip=true", f"train.epochs={epochs}",
            "train.batch_size=64", "run.threads=1", "run.progress=false", f"run.out_dir={out}", "run.name=pretrain"]
    subprocess.run([sys.executable, *args], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    state = torch.load(out / "pretrain" / "checkpoints" / "task_0.pt", map_location="cpu", weights_only=False)
    model = state["method"]["model"]
    torch.save({k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")}, ckpt)
    return ckpt


def jobs_of(method: str, ckpt: Path, seeds: list[int], out: Path, extra: list[str]):
    if method == "finetune-scratch":
        preset, over = "finetune/fashion-mnist-b0inc2", [VIT]
    elif method == "finetune":
        preset, over = "finetune/fashion-mnist-b0inc2", [VIT, f"model.pretrained={ckpt}"]
    elif method == "dytox":
        preset, over = "dytox/digits-b0inc2", [*DYTOX, f"model.pretrained={ckpt}"]
    else:
        base, options = preset_of(method)
        preset, over = f"{base}/fashion-mnist-b0inc2-pretrained", [f"model.pretrained={ckpt}", *options]
    return [(f"{method}-seed{s}", preset, [*over, *DATA, f"run.seed={s}", *extra], out) for s in seeds]


def memory_size(folder: Path) -> int:
    return int((yaml.safe_load((folder / "config.yaml").read_text()).get("memory") or {}).get("size") or 0)


def table(rows) -> str:
    lines = ["| method | start | memory | CIL Avg | CIL Last | CIL forgetting | TIL Avg | TIL Last | trainable #P "
             "| #P | CPU (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, results, memory in rows:
        r = results[0][0]
        start = "random" if method == "finetune-scratch" else "digits-pretrained"
        params = r["params"]
        cpu = sum(c for _, c in results) / len(results)
        lines.append(f"| {method.replace('-scratch', '')} | {start} | {memory} "
                     f"| {cell(results, 'class_il', 'avg_incremental')} | {cell(results, 'class_il', 'last')} "
                     f"| {cell(results, 'class_il', 'forgetting')} | {cell(results, 'task_il', 'avg_incremental')} "
                     f"| {cell(results, 'task_il', 'last')} | {int(r['tasks'][-1]['trainable']):,} "
                     f"| {int(params['final']):,} | {cpu:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join((*PRETRAINED_METHODS, "dytox", "finetune", "finetune-scratch")))
    ap.add_argument("--pretrain-epochs", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="/tmp/pretrained-rows")
    ap.add_argument("--write", action="store_true", help="rewrite the section of BENCHMARKS.md")
    args, extra = ap.parse_known_args()
    out = Path(args.out)
    ckpt = pretrain(out, args.pretrain_epochs)
    pre = json.loads((out / "pretrain" / "results.json").read_text())["class_il"]["last"]
    seeds = [int(s) for s in args.seeds.split(",")]
    groups = [(m, jobs_of(m, ckpt, seeds, out, extra)) for m in args.methods.split(",") if m]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [(m, [pool.submit(run, job) for job in jobs]) for m, jobs in groups]
        rows = [(m, [f.result() for f in fs], memory_size(out / jobs[0][0])) for (m, fs), (_, jobs) in
                zip(futures, groups)]
    body = table(rows)
    head = f"Pretraining: digits test accuracy {pre:.2f} after {args.pretrain_epochs} epochs."
    print(f"machine: {machine()}; seeds {args.seeds}\n{head}\n\n{body}")
    if args.write:
        update_section("Pretrained-ViT methods from a small pretrained ViT (digits -> Fashion-MNIST B0 5x2)",
                       f"{__doc__.split(chr(10) + chr(10), 1)[1] if __doc__ else ''}\nMachine: {machine()}. "
                       f"Seeds {args.seeds}; mean ± population std. {head}\n\n{body}\n")


if __name__ == "__main__":
    main()
