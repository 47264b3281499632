"""`vitcl bench PRESET`: images/s of a training step and of inference, and peak memory, after 1, 10, 50 ... tasks of
the preset's method and model, on whatever device there is, from random images of the preset's shape (no data is
read). What a user runs to plan a job.

A training step is the method's whole step of a real task: its `loss` (for DyTox after t tasks: the student, the
teacher and the distillation, the divergence head), backward, the optimiser's update with the phase's optimiser
(fused on CUDA, foreach elsewhere), `before_step` (gradient surgery) and `after_step` (a streaming memory's update,
FDR's and HAL's steps of their own). The earlier tasks run their memory updates and consolidations on random images
(`RandomImages`), so the memory holds rows of every seen class with the extras the method stores (DER's logits,
FDR's, LVT's); the batch is drawn from the phase's rows (for DyTox the task's and the memory's) and the rehearsal
batch (the phase's memory_batch rows) from the memory. A streaming memory (ER, DER, GSS ...) is filled by untimed
steps first. What the memory keeps is chosen at random (herding's cost is not a training step's: see
benchmarks/herding_speed.py). The scenario is the preset's, with the increment shrunk to reach the largest task count
asked for when the preset has fewer tasks (DyTox's CIFAR-100 B0-10 becomes 50 tasks of 2 classes for `--tasks
50`); each class gets as many rows as the memory keeps of it after the first task. Times are medians over `steps`
after `warmup` steps (compilation happens there); peak memory is CUDA's max_memory_allocated, or the process's peak
RSS on the CPU (which only grows: read it per row in the order measured)."""
from __future__ import annotations

import contextlib
import dataclasses
import resource
import statistics
import time
from dataclasses import dataclass

import torch

from .data.build import build_scenario
from .data.dataset import ImageSet
from .data.memory import RandomSelector, RankedMemory, make_budget
from .data.scenario import Scenario
from .engine.optim import build_optimizer
from .errors import ConfigError
from .methods import METHODS, Batch
from .methods.base import StepInfo
from .runconfig import load_config


@dataclass
class BenchRow:
    tasks: int
    classes: int
    precision: str
    compiled: bool
    train_images_per_s: float | None  # None: the task has no training phase
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


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _rate(images_per_s: float | None, unit: str = " img/s") -> str:
    return "no training in this task" if images_per_s is None else f"{images_per_s:,.0f}{unit}"


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
    return cfg, labelled_scenario(scenario, cfg)


class RandomImages:
    """A TaskContext whose images are random (normal, of the scenario's shape), for the memory updates and
    consolidations of the tasks before the measured one."""

    def __init__(self, scenario, method, device: torch.device, batch_size: int):
        self.scenario, self.method, self.device, self.batch_size = scenario, method, device, batch_size
        self.generator = torch.Generator().manual_seed(1)

    def images(self, n: int) -> torch.Tensor:
        return random_images(self.scenario, n, self.device, self.generator)

    def extract(self, indices, fn, augment=False, batch_size=None, generator=None, shard=True):
        model = self.method.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            outs = [fn(self.images(len(part))).float() for part in indices.split(batch_size or self.batch_size)]
        model.train(was_training)
        return torch.cat(outs)

    def batches(self, indices, augment=False, batch_size=None):
        for part in indices.split(batch_size or self.batch_size):
            yield self.images(len(part)), part

    def reduce_sum(self, t):
        return t

    def memory_banks(self, memory, task):
        for bank in (memory.banks[r] for r in memory.local) if isinstance(memory, RankedMemory) else [memory]:
            yield bank, self


MIN_ROWS = 16  # rows per class at least: what class statistics (prototypes, covariances, Fisher) are taken over


def labelled_scenario(scenario, cfg) -> Scenario:
    """The shapes-only scenario with labelled rows (their images a zero-size view: nothing reads them): as many per
    class as the memory keeps of a class after the first task, at least MIN_ROWS."""
    n = max(MIN_ROWS, make_budget(cfg.memory.size, cfg.memory.per_class).per_class(scenario.increments[0]))
    c, s = scenario.train.channels, scenario.train.image_size

    def images(rows: int) -> ImageSet:
        targets = torch.tensor(scenario.class_order).repeat_interleave(rows)
        return ImageSet(targets, torch.zeros(1, c, s, s, dtype=torch.uint8).expand(len(targets), c, s, s))

    out = Scenario(images(n), images(1), scenario.class_order, scenario.increments, scenario.setting,
                   scenario.class_names)
    out.mean, out.std = scenario.mean, scenario.std
    return out


@contextlib.contextmanager
def random_selection(memory):
    """The memory's selection swapped for a random one, which extracts nothing."""
    banks = memory.banks if isinstance(memory, RankedMemory) else [memory]
    kept = [bank.selector for bank in banks]
    for bank in banks:
        bank.selector = RandomSelector()
    try:
        yield
    finally:
        for bank, selector in zip(banks, kept):
            bank.selector = selector


def learn_earlier_tasks(method, scenario, n_tasks: int, ctx: RandomImages) -> None:
    """begin_task of the first n_tasks tasks; for all but the last, the memory update, consolidation and end_task
    as the engine runs them, on random images (no training), over as many rows of each class as the memory keeps
    (at least MIN_ROWS)."""
    memory = method.memory
    for t in range(n_tasks):
        method.begin_task(scenario[t])
        if t == n_tasks - 1:
            return
        task = rows_kept(scenario, scenario[t], memory)
        if memory.enabled and not memory.per_batch:
            with random_selection(memory):
                method.update_memory(task, ctx)
            if isinstance(memory, RankedMemory):
                memory.synchronise()
        method.consolidate(task, ctx)
        method.end_task(task)


def rows_kept(scenario, task, memory):
    """The task with the first rows of each class only, as many as the memory keeps after it (MIN_ROWS at least)."""
    keep = MIN_ROWS
    if memory.enabled and not memory.per_batch:
        keep = max(keep, memory.budget.per_class(task.end))
    labels = scenario.train_labels[task.train_idx]
    first = torch.cat([task.train_idx[labels == c][:keep] for c in task.labels])
    return dataclasses.replace(task, train_idx=first)


def phase_rows(method, phase, task) -> torch.Tensor:
    memory = method.memory
    rows = {"task": lambda: task.train_idx, "memory": memory.indices,
            "task+memory": lambda: torch.cat([task.train_idx, memory.indices()]),
            "seen": lambda: torch.cat([method.scenario[t].train_idx for t in range(task.index + 1)])}[phase.data]()
    return method.phase_rows(phase, task, rows)


def random_images(scenario, n: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    c, s = scenario.train.channels, scenario.train.image_size
    return torch.randn(n, c, s, s, generator=generator, device="cpu").to(device)


def make_batch(scenario, idx: torch.Tensor, device: torch.device, generator: torch.Generator,
               memory_rows: torch.Tensor | None = None) -> Batch:
    """The train-set rows `idx` with random images, their labels and tasks."""
    y = scenario.train_labels[idx]
    from_memory = torch.isin(idx, memory_rows).to(device) if memory_rows is not None else None
    return Batch(x=random_images(scenario, len(idx), device, generator), y=y.to(device),
                 task=scenario.task_of_label[y].to(device), index=idx, from_memory=from_memory,
                 position=torch.arange(len(idx)))


def memory_side_batch(method, size: int, device: torch.device, generator: torch.Generator) -> Batch | None:
    """The rehearsal batch: `size` rows drawn without replacement from the memory (a streaming memory's slots,
    which it carries in `slot`)."""
    memory = method.memory
    if size <= 0 or len(memory) == 0:
        return None
    drawn = torch.randperm(len(memory), generator=generator)[:size]
    rows = memory.indices()[drawn]
    batch = make_batch(method.scenario, rows, device, generator)
    batch.slot = drawn if memory.per_batch else None
    batch.from_memory = torch.ones(len(rows), dtype=torch.bool, device=device)
    batch.position = None
    return batch


def measure(cfg, scenario, n_tasks: int, precision: str, compiled: bool, batch: int, steps: int, warmup: int,
            device: torch.device) -> BenchRow:
    torch.manual_seed(0)
    method = METHODS.get(cfg.method.name, "method.name")(cfg, scenario, device)
    learn_earlier_tasks(method, scenario, n_tasks, RandomImages(scenario, method, device, batch))
    task = scenario[n_tasks - 1]
    phases = method.phases(task)
    if phases:
        method.setup_phase(phases[0], task)
    if compiled:
        for module in method.compile_modules():
            module.compile(backend=cfg.run.compile_backend)
    if not phases:  # the task only updates prototypes or statistics (SimpleCIL, APER after the first task)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        inference = infer_rate(method, precision, batch, steps, warmup, device)
        return BenchRow(n_tasks, task.end, precision, compiled, None, inference, _peak_mb(device), 0)
    phase = phases[0]
    params = [(n, p) for n, p in method.model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(params, phase.optim, method.lr_scales(phase, task))
    g = torch.Generator().manual_seed(0)
    memory_rows = method.memory.indices() if phase.data == "task+memory" else None
    rows = phase_rows(method, phase, task)
    b = make_batch(scenario, rows[torch.randint(0, len(rows), (batch,), generator=g)], device, g, memory_rows)
    autocast = _autocast(device, precision)
    done = 0  # images streamed so far: each step's positions follow on

    def stream():  # what follows a step: the method's after_step, a streaming memory taking the step's rows
        nonlocal done
        b.position = torch.arange(done, done + batch)
        method.after_step([b], phase, task, StepInfo(0, done // batch, batch))
        done += batch

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = method.loss(b, phase, task)
        loss.backward()
        method.before_step([b], phase, task)
        optimizer.step()
        stream()

    method.model.train()
    if method.memory.per_batch and phase.memory_batch > 0:  # stream until the memory is full (untimed, no update)
        for _ in range(-(-method.memory.capacity // batch)):
            with torch.no_grad(), autocast:
                method.loss(b, phase, task)
            stream()
    b.memory = memory_side_batch(method, phase.memory_batch, device, g)
    b.memory_more = [m for m in (memory_side_batch(method, phase.memory_batch, device, g)
                                 for _ in range(1, phase.memory_draws)) if m is not None]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train = _timed(train_step, steps, warmup, device)
    inference = infer_rate(method, precision, batch, steps, warmup, device, b.x)
    return BenchRow(n_tasks, task.end, precision, compiled, batch / train, inference, _peak_mb(device),
                    len(b.memory.y) if b.memory is not None else 0)


def infer_rate(method, precision: str, batch: int, steps: int, warmup: int, device: torch.device,
               x: torch.Tensor | None = None) -> float:
    """Images/s of the method's scores (every scorer it evaluates with) in evaluation mode."""
    if x is None:
        x = random_images(method.scenario, batch, device, torch.Generator().manual_seed(0))
    autocast = _autocast(device, precision)
    method.model.eval()

    def infer():
        with torch.inference_mode(), autocast:
            method.scores(x)

    return batch / _timed(infer, steps, warmup, device)


def bench_device(cfg) -> torch.device:
    """The device a bench of `cfg` measures on (run.device; auto: CUDA when there is one), with its threads set."""
    device = torch.device("cuda" if cfg.run.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.run.device == "auto" else cfg.run.device))
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    return device


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
    device = bench_device(cfg)
    size = batch or cfg.train.batch_size
    rows = []
    for n in tasks:
        for precision in precisions:
            for compiled in compile_modes:
                r = measure(cfg, scenario, n, precision, compiled, size, steps, warmup, device)
                rows.append(r)
                say(f"# {n} tasks ({r.classes} classes), {precision}, compile {'on' if compiled else 'off'}: train "
                    f"{_rate(r.train_images_per_s)}, inference {_rate(r.infer_images_per_s)}, "
                    f"peak {r.peak_mb:,.0f} MB")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"{cfg.method.name} · {cfg.model.name} · {scenario.describe()} · {name} · batch {size} · median of "
             f"{steps} steps after {warmup}", "",
             "| tasks | classes | precision | compile | train img/s | inference img/s | peak MB | memory batch |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.tasks} | {r.classes} | {r.precision} | {'on' if r.compiled else 'off'} | "
              f"{_rate(r.train_images_per_s, '')} | {r.infer_images_per_s:,.0f} | {r.peak_mb:,.0f} | {r.memory_batch} |"
              for r in rows]
    return rows, "\n".join(lines)
