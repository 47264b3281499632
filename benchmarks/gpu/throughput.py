"""The five-minute throughput check: DyTox's CIFAR-100 model (the 50-step scenario's, so that 1, 10 and 50 tasks
exist) after 1, 10 and 50 tasks, fp32 and bf16, with torch.compile off and on, on whatever device there is.

One training step is DyTox's whole step of a real task: the student's forward, the teacher's forward and the
distillation, the divergence head, backward and the AdamW update (at 1 task there is no teacher nor divergence
head, as in a real run). Inference is evaluation's scoring call. Random images of CIFAR's shape, batch 128; the
median over the timed steps after warm-up steps (compilation happens there). Peak memory: CUDA's
max_memory_allocated, or the process's peak RSS on the CPU. Run it whenever a GPU is at hand:

    PYTHONPATH=src python benchmarks/gpu/throughput.py [--tasks 1,10,50] [--precision fp32,bf16]
        [--compile off,on] [--steps 10] [--warmup 3] [--batch 128] [--write]

`--write` puts the table in BENCHMARKS.md under "Training throughput on <device>".
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import machine, update_section  # noqa: E402

from vitcl.data.build import build_scenario  # noqa: E402
from vitcl.engine.optim import build_optimizer  # noqa: E402
from vitcl.methods import METHODS, Batch  # noqa: E402
from vitcl.runconfig import load_config  # noqa: E402

PRESET = "dytox/cifar100-b0inc2"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(n_tasks: int, precision: str, compiled: bool, steps: int, warmup: int, batch: int,
            device: torch.device) -> dict:
    cfg, _ = load_config([PRESET], ["method.repeated_augmentation=1"])
    scenario = build_scenario(cfg.data, shapes_only=True)
    torch.manual_seed(0)
    method = METHODS.get("dytox")(cfg, scenario, device)
    for t in range(n_tasks):
        method.begin_task(scenario[t])
    task = scenario[n_tasks - 1]
    phase = method.phases(task)[0]
    method.setup_phase(phase, task)
    if compiled:
        method.model.compile()
    opt = build_optimizer([(n, p) for n, p in method.model.named_parameters() if p.requires_grad], phase.optim)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, task.end, (batch,), generator=g)
    b = Batch(x=torch.randn(batch, 3, 32, 32, generator=g).to(device), y=y.to(device),
              task=scenario.task_of_label[y].to(device), index=torch.arange(batch))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = method.loss(b, phase, task)
        loss.backward()
        opt.step()
        sync(device)
        if i >= warmup:
            train.append(time.perf_counter() - t0)
    method.model.eval()
    infer = []
    with torch.inference_mode():
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            with autocast:
                method.scores(b.x)
            sync(device)
            if i >= warmup:
                infer.append(time.perf_counter() - t0)
    return {"tasks": n_tasks, "precision": precision, "compile": compiled,
            "train": batch / statistics.median(train), "infer": batch / statistics.median(infer),
            "peak_mb": peak_bytes(device) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="1,10,50")
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--compile", default="off,on")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for n in [int(t) for t in args.tasks.split(",")]:
        for precision in args.precision.split(","):
            for compiled in [c == "on" for c in args.compile.split(",")]:
                r = measure(n, precision, compiled, args.steps, args.warmup, args.batch, device)
                rows.append(r)
                print(f"# {n} tasks, {precision}, compile {'on' if compiled else 'off'}: train {r['train']:,.0f} "
                      f"img/s, inference {r['infer']:,.0f} img/s, peak {r['peak_mb']:,.0f} MB", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = ["| tasks | precision | compile | train img/s | inference img/s | peak MB |", "|---|---|---|---|---|---|"]
    table += [f"| {r['tasks']} | {r['precision']} | {'on' if r['compile'] else 'off'} | {r['train']:,.0f} "
              f"| {r['infer']:,.0f} | {r['peak_mb']:,.0f} |" for r in rows]
    body = (f"`python benchmarks/gpu/throughput.py --steps {args.steps} --warmup {args.warmup} --batch "
            f"{args.batch}` on {machine()}: DyTox's CIFAR-100 model ({PRESET}), random 32x32 images, median of "
            f"{args.steps} steps after {args.warmup} warm-up steps.\n\n" + "\n".join(table))
    print("\n" + body)
    if args.write:
        update_section(f"Training throughput on {name}", body)


if __name__ == "__main__":
    main()
