"""DyTox inference cost against the number of tasks: batched task decoder vs the per-task loop.

The full DyTox forward (encoder + decoder + classifiers) at 1, 10 and 50 tasks of 2 classes (CIFAR-100 50 steps),
CIFAR shapes (32 px, patch 4: 64 patch tokens + the task token, dim 384), batch 128, fp32, eval mode. The two
decoders share the same weights; rounds run every configuration once, in a shuffled order, so that a busy
machine slows them alike; the median of the rounds is reported, and costs are ratios to the 1-task forward of the
same decoder. Both the CPU time of the process and the wall time are measured: on a shared machine the CPU time
(with one thread) is the steadier measure of the work done.

    PYTHONPATH=src python benchmarks/dytox_decoder_cost.py [--rounds 5] [--threads N] [--batch 128]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import random
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
    cpu: dict[tuple[str, int], list[float]] = {(m, t): [] for m in ("batched", "loop") for t in TASKS}
    with torch.inference_mode():
        for mode in ("batched", "loop"):  # warm-up
            nets[1].decoder.mode = mode
            nets[1](x)
        configs = [(t, mode) for t in TASKS for mode in ("batched", "loop")]
        order = random.Random(0)
        for _ in range(args.rounds):
            order.shuffle(configs)  # no configuration always runs first (or right after the slowest one)
            for t, mode in configs:
                nets[t].decoder.mode = mode
                t0, c0 = time.perf_counter(), time.process_time()
                out = nets[t](x)
                times[(mode, t)].append(time.perf_counter() - t0)
                cpu[(mode, t)].append(time.process_time() - c0)
                assert out.shape == (args.batch, 2 * t)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"batch {args.batch}, fp32, {args.rounds} rounds (median)")
    for label, data in (("CPU time", cpu), ("wall time", times)):
        med = {k: statistics.median(v) for k, v in data.items()}
        print(f"\n{label}\n")
        print("| tasks | batched decoder (s) | x 1 task | per-task loop (s) | x 1 task | loop / batched |")
        print("|---|---|---|---|---|---|")
        for t in TASKS:
            b, lo = med[("batched", t)], med[("loop", t)]
            print(f"| {t} | {b:.3f} | {b / med[('batched', 1)]:.2f} | {lo:.3f} | {lo / med[('loop', 1)]:.2f} "
                  f"| {lo / b:.2f} |")

if __name__ == "__main__":
    main()
