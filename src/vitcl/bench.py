"""`vitcl bench PRESET`: images/s of a training step and of inference, and peak memory, after 1, 10, 50 ... tasks of
the preset's method and model, on whatever device there is, from random images of the preset's shape (no data is
read). What a user runs to plan a job.

A training step is the method's whole step of a real task: its `loss` (for DyTox after t tasks: the student, the
teacher and the distillation, the divergence head), backward, the optimiser's update with the phase's optimiser
(fused on CUDA, foreach elsewhere), and `before_step` (gradient surgery); a rehearsal batch (the phase's
memory_batch rows) rides along where the phase draws one and the method reads nothing stored with its rows. The
scenario is the preset's, with the increment shrunk to reach the largest task count asked for when the preset has
fewer tasks (DyTox's CIFAR-100 B0-10 becomes 50 tasks of 2 classes for `--tasks 50`). Times are medians over `steps`
after `warmup` steps (compilation happens there); peak memory is CUDA's max_memory_allocated, or the process's peak
RSS on the CPU (which only grows: read it per row in the order measured)."""
from __future__ import annotations

import contextlib
import resource
import statistics
import time
from dataclasses import dataclass

import torch

from .data.build import build_scenario
from .engine.optim import build_optimizer
from .errors import ConfigError
from .methods import METHODS, Batch
from .runconfig import load_config


@dataclass
class BenchRow:
    tasks: int
    classes: int
    precision: str
    compiled: bool
    train_images_per_s: float
    infer_images_per_s: float
    peak_mb: float
    memory_batch: int  # rows of the rehearsal batch in each step (0: none)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds of fn() over `steps` calls after `warmup` calls."""
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_config(sources: list[str], overrides: list[str], max_tasks: int):
    """The preset's config, its increment shrunk (B0, equal tasks) when it has fewer than max_tasks tasks."""
    cfg, _ = load_config(sources, overrides)
    scenario = build_scenario(cfg.data, shapes_only=True)
    if len(scenario) < max_tasks:
        classes = scenario.num_classes
        if classes < max_tasks:
            raise ConfigError(f"--tasks: {max_tasks} tasks need at least {max_tasks} classes; "
                              f"{cfg.data.dataset} has {classes}")
        cfg, _ = load_config(sources, [*overrides, "data.initial_increment=0",
                                       f"data.increment={classes // max_tasks}"])
        scenario = build_scenario(cfg.data, shapes_only=True)
    return cfg, scenario


def random_batch(scenario, task, size: int, device: torch.device, generator: torch.Generator) -> Batch:
    c, s = scenario.train.channels, scenario.train.image_size
    y = torch.randint(0, task.end, (size,), generator=generator)
    return Batch(x=torch.randn(size, c, s, s, generator=generator).to(device), y=y.to(device),
                 task=scenario.task_of_label[y].to(device), index=torch.arange(size))


def measure(cfg, scenario, n_tasks: int, precision: str, compiled: bool, batch: int, steps: int, warmup: int,
            device: torch.device) -> BenchRow:
    torch.manual_seed(0)
    method = METHODS.get(cfg.method.name, "method.name")(cfg, scenario, device)
    with torch.device(device):
        for t in range(n_tasks):
            method.begin_task(scenario[t])
            if t < n_tasks - 1:
                method.end_task(scenario[t])
    task = scenario[n_tasks - 1]
    phase = method.phases(task)[0]
    method.setup_phase(phase, task)
    if compiled:
        for module in method.compile_modules():
            module.compile(backend=cfg.run.compile_backend)
    params = [(n, p) for n, p in method.model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(params, phase.optim, method.lr_scales(phase, task))
    g = torch.Generator().manual_seed(0)
    b = random_batch(scenario, task, batch, device, g)
    if phase.memory_batch > 0:
        b.memory = random_batch(scenario, task, phase.memory_batch, device, g)
        try:  # a method that reads extras stored with its memory rows (DER's logits) has none here
            method.loss(b, phase, task)
        except (KeyError, IndexError, AttributeError):
            b.memory = None
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = method.loss(b, phase, task)
        loss.backward()
        method.before_step([b], phase, task)
        optimizer.step()

    method.model.train()
    train = _timed(train_step, steps, warmup, device)
    method.model.eval()

    def infer():
        with torch.inference_mode(), autocast:
            method.scores(b.x)

    inference = _timed(infer, steps, warmup, device)
    return BenchRow(n_tasks, task.end, precision, compiled, batch / train, batch / inference, _peak_mb(device),
                    len(b.memory.y) if b.memory is not None else 0)


def run_bench(sources: list[str], overrides: list[str], tasks: list[int], precisions: list[str],
              compile_modes: list[bool], batch: int | None, steps: int, warmup: int, say=print) -> tuple[list, str]:
    """Every (tasks, precision, compile) row; `say` gets a line per row as it is measured."""
    for p in precisions:
        if p not in ("fp32", "bf16"):
            raise ConfigError(f"--precision: expected fp32 or bf16, got '{p}'")
    if not tasks or min(tasks) < 1:
        raise ConfigError("--tasks: expected task counts >= 1, e.g. 1,10,50")
    cfg, scenario = bench_config(sources, overrides, max(tasks))
    if max(tasks) > len(scenario):
        raise ConfigError(f"--tasks: the scenario has {len(scenario)} tasks, fewer than {max(tasks)}")
    device = torch.device("cuda" if cfg.run.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.run.device == "auto" else cfg.run.device))
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    size = batch or cfg.train.batch_size
    rows = []
    for n in tasks:
        for precision in precisions:
            for compiled in compile_modes:
                r = measure(cfg, scenario, n, precision, compiled, size, steps, warmup, device)
                rows.append(r)
                say(f"# {n} tasks ({r.classes} classes), {precision}, compile {'on' if compiled else 'off'}: train "
                    f"{r.train_images_per_s:,.0f} img/s, inference {r.infer_images_per_s:,.0f} img/s, "
                    f"peak {r.peak_mb:,.0f} MB")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"{cfg.method.name} · {cfg.model.name} · {scenario.describe()} · {name} · batch {size} · median of "
             f"{steps} steps after {warmup}", "",
             "| tasks | classes | precision | compile | train img/s | inference img/s | peak MB | memory batch |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.tasks} | {r.classes} | {r.precision} | {'on' if r.compiled else 'off'} | "
              f"{r.train_images_per_s:,.0f} | {r.infer_images_per_s:,.0f} | {r.peak_mb:,.0f} | {r.memory_batch} |"
              for r in rows]
    return rows, "\n".join(lines)
