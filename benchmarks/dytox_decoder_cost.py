"""DyTox inference cost against the number of tasks: batched task decoder vs the per-task loop.

The full DyTox forward (encoder + decoder + classifiers) at 1, 10 and 50 tasks of 2 classes (CIFAR-100 50 steps),
CIFAR shapes (32 px, patch 4: 64 patch tokens + the task token, dim 384), batch 128, fp32, eval mode. The two
decoders share the same weights; rounds interleave every configuration so that a busy machine slows them alike;
the median of the rounds is reported, and costs are ratios to the 1-task forward of the same decoder.

    PYTHONPATH=src python benchmarks/dytox_decoder_cost.py [--rounds 5] [--threads N] [--batch 128]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
from torch import nn

from vitcl.models.convit import ConViT
from vitcl.models.dytox import DyToxNet

TASKS = (1, 10, 50)


def build(max_tasks: int) -> dict[int, DyToxNet]:
    torch.manual_seed(0)
    full = DyToxNet(ConViT(32, 3))  # the CIFAR DyTox: dim 384, 12 heads, 5 GPSA SABs + 1 TAB, patch 4
    for _ in range(max_tasks):
        full.add_task(2, divergence=False)
    nets = {}
    for t in TASKS:
        net = copy.copy(full)  # shares every module and parameter; only the token and head lists are cut
        net._modules = dict(full._modules)
        net.task_tokens = nn.ParameterList(list(full.task_tokens)[:t])
        net.heads = nn.ModuleList(list(full.heads)[:t])
        nets[t] = net.eval()
    return nets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    nets = build(max(TASKS))
    x = torch.randn(args.batch, 3, 32, 32)
    times: dict[tuple[str, int], list[float]] = {(m, t): [] for m in ("batched", "loop") for t in TASKS}
    with torch.inference_mode():
        for mode in ("batched", "loop"):  # warm-up
            nets[1].decoder.mode = mode
            nets[1](x)
        for r in range(args.rounds):
            for t in TASKS:
                for mode in ("batched", "loop"):
                    nets[t].decoder.mode = mode
                    t0 = time.perf_counter()
                    out = nets[t](x)
                    times[(mode, t)].append(time.perf_counter() - t0)
                    assert out.shape == (args.batch, 2 * t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"batch {args.batch}, fp32, {args.rounds} rounds (median)")
    print("| tasks | batched decoder (s) | x 1 task | per-task loop (s) | x 1 task |")
    print("|---|---|---|---|---|")
    for t in TASKS:
        b, lo = med[("batched", t)], med[("loop", t)]
        print(f"| {t} | {b:.3f} | {b / med[('batched', 1)]:.2f} | {lo:.3f} | {lo / med[('loop', 1)]:.2f} |")


if __name__ == "__main__":
    main()
