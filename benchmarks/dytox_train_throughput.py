"""DyTox training throughput against the number of tasks (images/s, fp32).

One full DyTox training step (student forward, teacher forward and KD, divergence head, backward, AdamW step) of
the CIFAR-100 50-steps model (dim 384, 5 GPSA SABs + 1 TAB, patch 4 on 32 px) after 1, 2, 10 and 50 tasks of 2
classes, batch 128, random images. At 1 task there is no teacher and no divergence head, as in a real run.
`--modes batched,loop` also times the per-task-loop decoder (the public code's) on the same steps. Throughput is
given per second of process CPU time (steady on a shared machine, with one thread) and per wall-clock second.

    PYTHONPATH=src python benchmarks/dytox_train_throughput.py [--steps 2] [--threads N] [--modes batched,loop]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from vitcl.data.build import build_scenario
from vitcl.engine.optim import build_optimizer
from vitcl.methods import METHODS, Batch
from vitcl.runconfig import load_config

TASKS = (1, 2, 10, 50)  # 2: the first task with a teacher and a divergence head


def step_times(mode: str, n_tasks: int, steps: int, batch: int) -> tuple[list[float], list[float]]:
    cfg, _ = load_config(["dytox/cifar100-b0inc2"], [f"model.decoder={mode}", "method.repeated_augmentation=1"])
    scenario = build_scenario(cfg.data, shapes_only=True)
    torch.manual_seed(0)
    method = METHODS.get("dytox")(cfg, scenario, torch.device("cpu"))
    for t in range(n_tasks):
        method.begin_task(scenario[t])
    task = scenario[n_tasks - 1]
    phase = method.phases(task)[0]
    method.setup_phase(phase, task)
    opt = build_optimizer([(n, p) for n, p in method.model.named_parameters() if p.requires_grad], phase.optim)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, task.end, (batch,), generator=g)
    b = Batch(x=torch.randn(batch, 3, 32, 32, generator=g), y=y, task=scenario.task_of_label[y],
              index=torch.arange(batch))
    wall, cpu = [], []
    for _ in range(steps + 1):  # the first step warms up
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss, _ = method.loss(b, phase, task)
        loss.backward()
        opt.step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return cpu[1:], wall[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--modes", default="batched,loop")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    cpu, wall = {}, {}
    for t in TASKS:
        for mode in modes:
            c, w = step_times(mode, t, args.steps, args.batch)
            cpu[(mode, t)], wall[(mode, t)] = args.batch / statistics.median(c), args.batch / statistics.median(w)
            print(f"# {mode} {t} tasks: {cpu[(mode, t)]:.1f} images per CPU-second, {wall[(mode, t)]:.1f} per second",
                  flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; batch {args.batch}, fp32, "
          f"median of {args.steps} steps after one warm-up")
    for label, rows in (("images per CPU-second", cpu), ("images per wall-clock second", wall)):
        print(f"\n{label}\n")
        print("| tasks | " + " | ".join(f"{m} decoder | vs 1 task" for m in modes) + " |")
        print("|---|" + "---|---|" * len(modes))
        for t in TASKS:
            cells = [f"{rows[(m, t)]:.2f} | {rows[(m, 1)] / rows[(m, t)]:.2f}x slower" for m in modes]
            print(f"| {t} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
