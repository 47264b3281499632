"""The one training loop: tasks -> phases -> epochs -> batches, with evaluation, checkpoints and exact resume.

Exact resume: every epoch reseeds torch's generator from (seed, task, phase, epoch, rank) and draws its data
order from (seed, task, phase, epoch), so a run restarted from the checkpoint of epoch e repeats epoch e+1 of the
uninterrupted run bit for bit (on CPU). A checkpoint holds the method (model, memory, teacher ...), the
optimiser, the progress counters and every metric so far.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config
from ..data import distributed as dist
from ..data.augment import BatchAugment, mix_batch
from ..data.build import build_scenario
from ..data.stream import BatchStream, epoch_order, global_batches, rank_share
from ..errors import ConfigError, TrainingError
from ..eval import jsonfile
from ..eval.evaluator import evaluate
from ..eval.locality import HeldoutBatch, analyse_task, heldout_batch, summarise
from ..eval.report import build_results
from ..methods import METHODS, Batch, Method, Phase
from . import checkpoint
from .optim import build_optimizer, lr_at, set_lr
from .progress import Progress, fmt_time


def stable_seed(*parts) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: '{name}' asked for, but no CUDA device is available")
    return torch.device(name)


@dataclass
class RunState:
    task: int = 0
    phase: int = 0
    epoch: int = 0  # next epoch to run in the phase
    begun: bool = False  # begin_task already ran for `task`
    memory_updated: bool = False
    evals: list[dict] = field(default_factory=list)  # task-end evaluations, in order
    periodic: list[dict] = field(default_factory=list)  # periodic evaluations during training: task, epoch, accuracies
    tasks: list[dict] = field(default_factory=list)  # per task: params, time, throughput, peak memory
    task_time: float = 0.0  # seconds spent in the current task before the last checkpoint
    task_images: int = 0


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, progress: bool = True):
        self.cfg, self.run_dir = cfg, run_dir
        self.device = pick_device(cfg.run.device)
        if self.device.type == "cuda" and self.device.index is None and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.rank, self.world = dist.init_from_env(self.device)
        if cfg.train.batch_size % self.world:
            raise ConfigError(f"train.batch_size: {cfg.train.batch_size} does not split over {self.world} processes")
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(stable_seed(cfg.run.seed, "build"))
        self.scenario = build_scenario(cfg.data)
        method_cls = METHODS.get(cfg.method.name, "method.name")
        self.method: Method = method_cls(cfg, self.scenario, self.device)
        if cfg.run.compile:
            self.method.model.compile()
        self.augment = BatchAugment(cfg.data.augment, self.scenario.mean, self.scenario.std,
                                    self.scenario.train.channels)
        self.train_stream = BatchStream(self.scenario.train, self.device, cfg.data.num_workers)
        self.test_stream = BatchStream(self.scenario.test, self.device, cfg.data.num_workers)
        self.progress = Progress(progress and cfg.run.progress and dist.is_main())
        self.state = RunState()
        self.ckpt_dir = run_dir / "checkpoints"
        self._heldout: HeldoutBatch | None = None

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        if self.cfg.run.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def phase_indices(self, phase: Phase, task) -> torch.Tensor:
        """The train-set rows of `phase.data`, as the method's `phase_rows` narrows them."""
        return self.method.phase_rows(phase, task, self.data_rows(phase, task))

    def data_rows(self, phase: Phase, task) -> torch.Tensor:
        if phase.data == "task":
            return task.train_idx
        if phase.data == "memory":
            return self.method.memory.indices()
        if phase.data == "task+memory":
            return torch.cat([task.train_idx, self.method.memory.indices()])
        if phase.data == "seen":
            return torch.cat([self.scenario[t].train_idx for t in range(task.index + 1)])
        raise ValueError(f"phase {phase.name}: unknown data '{phase.data}'")

    def extract(self, indices: torch.Tensor, fn, augment: bool = False, batch_size: int | None = None):
        """fn(images) for the train-set rows `indices`, in order, without gradients; sharded over ranks and
        gathered, so every rank gets the same result."""
        bs = batch_size or self.cfg.eval.batch_size
        model = self.method.model
        was_training = model.training
        model.eval()
        mine = rank_share(indices, self.rank, self.world)
        counts = [len(rank_share(indices, r, self.world)) for r in range(self.world)]
        outs = []
        with torch.no_grad():
            for x_u8, _ in self.train_stream(list(mine.split(bs))):
                x = self.augment.train(x_u8) if augment else self.augment.test(x_u8)
                with self.autocast():
                    outs.append(fn(x).float())
        model.train(was_training)
        local = torch.cat(outs) if outs else torch.empty(0, device=self.device)
        if self.world > 1:
            if not outs:  # this rank held no rows: learn the feature shape from one row
                with torch.no_grad():
                    x_u8, _ = next(iter(self.train_stream([indices[:1]])))
                    local = fn(self.augment.test(x_u8)).float()[:0]
            local = dist.all_gather_rows(local, counts)
        return local

    def batches(self, indices: torch.Tensor, augment: bool = False, batch_size: int | None = None):
        """(normalised images, train-set rows) for this rank's share of `indices`, in order; gradients are the
        caller's business (combine per-rank sums with reduce_sum)."""
        bs = batch_size or self.cfg.eval.batch_size
        mine = rank_share(indices, self.rank, self.world)
        for x_u8, idx in self.train_stream(list(mine.split(bs))):
            yield (self.augment.train(x_u8) if augment else self.augment.test(x_u8)), idx

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (a no-op on one process)."""
        return dist.all_reduce_sum(t)

    def save_checkpoint(self, name: str = "last.pt", optimizer=None) -> None:
        """Besides the state: the config it was trained with, the number of processes, and how many bytes of
        metrics.jsonl belong to it (a resume cuts the file back to them, dropping records of unsaved work)."""
        if not dist.is_main():
            return
        metrics = self.run_dir / "metrics.jsonl"
        state = {"format": 1, "progress": vars(self.state), "method": self.method.state_dict(),
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "config": self.cfg.to_dict(), "world_size": self.world,
                 "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0}
        path = self.ckpt_dir / name
        try:
            checkpoint.save_atomic(state, path)
        except OSError as exc:
            reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            last = self.ckpt_dir / "last.pt"
            kept = (f"the previous checkpoint {last} is intact; `vitcl resume {self.run_dir}` continues from it"
                    if last.exists() else "no checkpoint was kept yet")
            raise TrainingError(f"{path}: writing the checkpoint failed ({reason}); {kept}") from None

    def log_metrics(self, record: dict) -> None:
        if dist.is_main():
            path = self.run_dir / "metrics.jsonl"
            try:
                with open(path, "a") as f:
                    f.write(jsonfile.dumps(record) + "\n")
            except OSError as exc:
                reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
                raise TrainingError(f"{path}: writing a metrics record failed ({reason}); the last checkpoint "
                                    f"{self.ckpt_dir / 'last.pt'} is intact") from None

    # ------------------------------------------------------------------ resume
    def restore(self, ckpt: dict) -> dict | None:
        """Rebuild the model's structure up to the checkpoint's task, then load every state."""
        self.state = RunState(**ckpt["progress"])
        last = self.state.task if self.state.begun else self.state.task - 1
        for t in range(last + 1):
            self.method.begin_task(self.scenario[t])
        self.method.load_state_dict(ckpt["method"])
        return ckpt.get("optimizer")

    def restore_task_checkpoints(self):
        """For each task checkpoint of the run folder, in task order: a fresh method restored from it becomes
        `self.method`; yields (task index, checkpoint)."""
        for t, path in task_checkpoints(self.run_dir):
            ckpt = checkpoint.load(path)
            self.method = type(self.method)(self.cfg, self.scenario, self.device)
            self.restore(ckpt)
            yield t, ckpt

    # ------------------------------------------------------------------ the loop
    def fit(self, optimizer_state: dict | None = None) -> dict:
        s, cfg = self.state, self.cfg
        for t in range(s.task, len(self.scenario)):
            task = self.scenario[t]
            task_t0 = time.perf_counter() - s.task_time
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            if not s.begun:
                torch.manual_seed(stable_seed(cfg.run.seed, t, "begin"))
                self.method.begin_task(task)
                s.begun = True
            phases = self.method.phases(task)
            mem_at = next((i for i, p in enumerate(phases) if p.data == "memory"), len(phases))
            for p in range(s.phase, len(phases)):
                phase = phases[p]
                if p == mem_at and not s.memory_updated:
                    self.update_memory(task)
                self.run_phase(task, p, phase, optimizer_state, task_t0)
                optimizer_state = None
                s.phase, s.epoch = p + 1, 0
            if not s.memory_updated:
                self.update_memory(task)
            torch.manual_seed(stable_seed(cfg.run.seed, t, "consolidate"))
            self.method.consolidate(task, self)
            self.method.end_task(task)
            self.finish_task(task, time.perf_counter() - task_t0)
        return self.results()

    def update_memory(self, task) -> None:
        if self.method.memory.enabled:
            t0 = time.perf_counter()
            torch.manual_seed(stable_seed(self.cfg.run.seed, task.index, "memory"))
            self.method.update_memory(task, self)
            self.progress.message(f"task {task.index + 1}/{len(self.scenario)} · memory: "
                                  f"{len(self.method.memory)} exemplars ({time.perf_counter() - t0:.1f}s)")
        self.state.memory_updated = True

    def run_phase(self, task, p: int, phase: Phase, optimizer_state, task_t0: float) -> None:
        s, cfg = self.state, self.cfg
        self.method.setup_phase(phase, task)
        named = [(n, q) for n, q in self.method.model.named_parameters() if q.requires_grad]
        optimizer = build_optimizer(named, phase.optim)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        params = [q for _, q in named]
        indices = self.phase_indices(phase, task)
        if len(indices) == 0:
            raise TrainingError(f"task {task.index}: phase '{phase.name}' has no data ({phase.data} is empty)")
        epoch_len = len(epoch_order(len(indices), 0, False, phase.repeats, phase.repeat_mode))
        n_batches = len(global_batches(torch.arange(epoch_len), phase.batch_size, phase.drop_last))
        if cfg.train.max_batches:
            n_batches = min(n_batches, cfg.train.max_batches)
        label = f"task {task.index + 1}/{len(self.scenario)} · {phase.name}"
        self.progress.start_phase(label, n_batches * max(phase.epochs - s.epoch, 0))
        for epoch in range(s.epoch, phase.epochs):
            torch.manual_seed(stable_seed(cfg.run.seed, task.index, p, epoch, self.rank))
            set_lr(optimizer, lr_at(phase.optim, phase.epochs, epoch))
            self.progress.start_epoch()
            loss = self.train_epoch(task, p, phase, epoch, indices, optimizer, params, label)
            s.epoch = epoch + 1
            s.task_time = time.perf_counter() - task_t0
            extra = ""
            periodic = cfg.train.eval_every and s.epoch % cfg.train.eval_every == 0 and s.epoch < phase.epochs
            if periodic:
                res = self.evaluate(task.index)
                key = "seen_task_il" if self.method.task_conditioned else "seen_class_il"
                extra = f"acc {res[key]:.2f}"
                s.periodic.append({"task": task.index, "phase": phase.name, "epoch": s.epoch,
                                   "class_il": res["class_il"], "task_il": res["task_il"]})
                self.log_metrics({"kind": "periodic", "task": task.index, "phase": phase.name, "epoch": s.epoch,
                                  "loss": loss, **res})
            self.progress.end_epoch(f"epoch {s.epoch}/{phase.epochs} · "
                                    f"lr {lr_at(phase.optim, phase.epochs, epoch):.2e}", extra)
            if s.epoch % cfg.train.checkpoint_every == 0 or s.epoch == phase.epochs:
                self.save_checkpoint(optimizer=optimizer)

    def train_epoch(self, task, p, phase, epoch, indices, optimizer, params, label) -> float:
        cfg = self.cfg
        order = epoch_order(len(indices), stable_seed(cfg.run.seed, task.index, p, epoch, "order"), phase.shuffle,
                            phase.repeats, phase.repeat_mode)
        batches = global_batches(order, phase.batch_size, phase.drop_last)
        if cfg.train.max_batches:
            batches = batches[: cfg.train.max_batches]
        accum = cfg.train.grad_accum
        memory_rows = self.method.memory.indices() if phase.data == "task+memory" else None
        side = self.method.memory.indices() if phase.memory_batch > 0 else None
        side = side if side is not None and len(side) else None
        loss_sum, n_steps = 0.0, 0
        for step, gb in enumerate(batches):
            share = rank_share(gb, self.rank, self.world)
            micro = [m for m in share.tensor_split(accum) if len(m)] if len(share) else []
            rows = [indices[m] for m in micro]
            side_rows = self.memory_batch_rows(side, phase.memory_batch, len(micro),
                                               (cfg.run.seed, task.index, p, epoch, step, "memory-batch"))
            optimizer.zero_grad(set_to_none=True)
            shares = torch.zeros((), dtype=torch.float64)  # this rank's share of the step's loss
            for (x_u8, idx), m, mrows in zip(self.train_stream(rows), micro, side_rows):
                batch = self.make_batch(x_u8, idx, memory_rows)
                if mrows is not None and len(mrows):
                    mx_u8, midx = next(iter(self.train_stream([mrows])))
                    batch.memory = self.make_batch(mx_u8, midx, None)
                    batch.memory.from_memory = torch.ones(len(midx), dtype=torch.bool, device=mx_u8.device)
                with self.autocast():
                    loss, logs = self.method.loss(batch, phase, task)
                (loss * (len(m) * self.world / len(gb))).backward()
                shares += loss.detach().double().cpu() * len(m) / len(gb)
            step_loss = dist.average_gradients(params, extra=shares * self.world)  # sum of shares
            if not math.isfinite(step_loss):
                raise TrainingError(f"task {task.index} '{phase.name}' epoch {epoch + 1}: the loss is {step_loss}; "
                                    f"stopped, the last checkpoint is {self.ckpt_dir / 'last.pt'}")
            if phase.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, phase.grad_clip)
            optimizer.step()
            loss_sum, n_steps = loss_sum + step_loss, n_steps + 1
            self.progress.step(len(gb), step_loss, f"epoch {epoch + 1}/{phase.epochs}")
            self.state.task_images += len(gb)
        return loss_sum / max(n_steps, 1)

    def memory_batch_rows(self, memory: torch.Tensor | None, size: int, n_micro: int, seed_parts) -> list:
        """This rank's memory rows for each micro-batch of one step: a seeded draw without replacement of `size`
        rows of the memory (all of it when smaller), the same global draw on every rank."""
        if memory is None or size <= 0:
            return [None] * n_micro
        g = torch.Generator().manual_seed(stable_seed(*seed_parts))
        pick = memory[torch.randperm(len(memory), generator=g)[:size]]
        return list(rank_share(pick, self.rank, self.world).tensor_split(max(n_micro, 1)))[:n_micro]

    def make_batch(self, x_u8, idx, memory_rows) -> Batch:
        y = self.scenario.train_labels[idx]
        x = self.augment.train(x_u8)
        soft = None
        if self.augment.mixes:
            x, soft, _ = mix_batch(x, y.to(x.device), self.method.seen, self.cfg.data.augment)
        from_memory = None
        if memory_rows is not None:
            from_memory = torch.isin(idx, memory_rows).to(x.device)
        return Batch(x=x, y=y.to(x.device), task=self.scenario.task_of_label[y].to(x.device), index=idx,
                     soft=soft, from_memory=from_memory)

    def evaluate(self, upto: int) -> dict:
        res = evaluate(self.method, self.scenario, upto, self.augment, self.test_stream, self.cfg.eval.batch_size,
                       self.cfg.eval.top_k, self.autocast)
        return res.to_dict()

    def finish_task(self, task, seconds: float) -> None:
        s = self.state
        res = self.evaluate(task.index)
        count = self.method.count_parameters()
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        info = {"task": task.index, "classes": task.num_classes, "params": count.total,
                "trainable": count.trainable, "seconds": seconds, "images": s.task_images,
                "images_per_s": s.task_images / max(seconds, 1e-9), "peak_memory_bytes": int(peak),
                "peak_memory_kind": "cuda" if self.device.type == "cuda" else "cpu-rss"}
        if self.cfg.eval.analyses and dist.is_main():
            self.record_analyses(task.index)
        s.evals.append(res)
        s.tasks.append(info)
        self.log_metrics({"kind": "task_end", **res, **{k: v for k, v in info.items() if k != "task"}})
        msg = f"task {task.index + 1}/{len(self.scenario)} done in {fmt_time(seconds)}"
        if not self.method.task_conditioned:
            msg += f" · class-IL {res['seen_class_il']:.2f}"
        self.progress.message(msg + f" · task-IL {res['seen_task_il']:.2f}")
        s.task, s.phase, s.epoch, s.begun, s.memory_updated = task.index + 1, 0, 0, False, False
        s.task_time, s.task_images = 0.0, 0
        self.save_checkpoint(f"task_{task.index}.pt")  # before last.pt: a resume never skips a task checkpoint
        self.save_checkpoint()
        if dist.is_main():
            write_results(self.run_dir, self.results())

    def heldout(self) -> HeldoutBatch:
        """The fixed held-out test batch of the locality analyses (built once per process)."""
        if self._heldout is None:
            ev = self.cfg.eval
            self._heldout = heldout_batch(self.scenario, self.test_stream, self.augment, ev.analysis_samples,
                                          ev.batch_size)
        return self._heldout

    def record_analyses(self, task: int) -> None:
        """The analyses of eval.analyses after a task, into RUN_DIR/analysis (plots in RUN_DIR/plots)."""
        ev, out = self.cfg.eval, self.run_dir / "analysis"
        analyse_task(self.method, self.heldout(), task, out, ev.analyses, ev.analysis_images)
        summarise(out, self.cfg.method.name)

    def results(self) -> dict:
        return build_results(self.cfg, self.scenario, self.state.evals, self.state.tasks, self.method,
                             self.state.periodic)


def task_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(task index, path) of a run folder's checkpoints/task_N.pt, in task order."""
    paths = [(int(p.stem.split("_")[1]), p) for p in (run_dir / "checkpoints").glob("task_*.pt")]
    return sorted(paths)


def rewind_metrics(run_dir: Path, ckpt: dict) -> None:
    """Cut metrics.jsonl back to the records of the checkpoint's state: what the killed process logged after
    its last checkpoint (a task_end before the task's checkpoint, a half-written line) is logged again."""
    size = ckpt.get("metrics_bytes")
    path = run_dir / "metrics.jsonl"
    if size is not None and path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)


def write_results(run_dir: Path, results: dict) -> None:
    path = run_dir / "results.json"
    try:
        jsonfile.write_atomic(path, results)
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise TrainingError(f"{path}: writing the results failed ({reason}); the checkpoints are intact, "
                            f"`vitcl resume {run_dir}` writes them again") from None

