"""The one training loop: tasks -> phases -> epochs -> batches, with evaluation, checkpoints and exact resume.

Exact resume: every epoch reseeds torch's generator from (seed, task, phase, epoch, rank) and draws its data
order from (seed, task, phase, epoch), so a run restarted from the checkpoint of epoch e repeats epoch e+1 of the
uninterrupted run bit for bit (on CPU). A checkpoint holds the method (model, memory, teacher ...), the
optimiser, the progress counters and every metric so far.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import math
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..config import Config
from ..data import distributed as dist
from ..data.augment import BatchAugment, mix_batch
from ..data.build import build_scenario
from ..data.crops import crop_spec
from ..data.memory import Memory, RankedMemory
from ..data.stream import BatchStream, crop_keys, epoch_order, global_batches, rank_share
from ..data.stream_memory import StreamMemory
from ..data.transfer import to_device
from ..errors import ConfigError, TrainingError
from ..eval import jsonfile
from ..eval.evaluator import evaluate
from ..eval.locality import HeldoutBatch, analyse_task, heldout_batch, summarise
from ..eval.loggers import RunLoggers, check_available, step_key
from ..eval.report import build_results
from ..methods import METHODS, Batch, Method, Phase
from ..methods.base import StepInfo, TaskContext
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


class RankContext:
    """The TaskContext of one emulated rank's memory update: every candidate on this process (each DyTox process
    herds on the whole task), the training augmentation drawn from the rank's own generator, sums kept local.
    So a bank is the same whichever process, and with whichever other banks, computes it."""

    def __init__(self, trainer: Trainer, seed: int):
        self.trainer = trainer
        torch.manual_seed(seed)  # draws from the global generator (kornia's RandAugment) are the rank's own too
        self.generator = torch.Generator(device=trainer.device).manual_seed(seed)

    def extract(self, indices: torch.Tensor, fn, augment: bool = False, batch_size: int | None = None):
        return self.trainer.extract(indices, fn, augment, batch_size, generator=self.generator, shard=False)

    def batches(self, indices: torch.Tensor, augment: bool = False, batch_size: int | None = None):
        t = self.trainer
        for x_u8, idx in t.train_stream(list(indices.split(batch_size or t.cfg.eval.batch_size))):
            yield (t.augment.train(x_u8, self.generator) if augment else t.augment.test(x_u8)), idx

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def memory_banks(self, memory, task):
        raise TypeError("a rank's context fills its own bank only")


CHECK_EVERY = 50  # training steps between two reads of the loss on the host (the NaN check)


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
        if cfg.memory.ranks > 1 and cfg.memory.ranks % self.world:
            raise ConfigError(f"memory.ranks: {cfg.memory.ranks} emulated ranks do not split over {self.world} "
                              f"processes (expected a multiple of the world size)")
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(stable_seed(cfg.run.seed, "build"))
        self.scenario = build_scenario(cfg.data)
        method_cls = METHODS.get(cfg.method.name, "method.name")
        self.method: Method = method_cls(cfg, self.scenario, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.run.tf32
            torch.backends.cudnn.allow_tf32 = cfg.run.tf32
        if cfg.run.compile:
            for module in self.method.compile_modules():
                module.compile(backend=cfg.run.compile_backend)
        self.augment = BatchAugment(cfg.data.augment, self.scenario.mean, self.scenario.std,
                                    self.scenario.train.channels)
        self.train_stream = BatchStream(self.scenario.train, self.device, cfg.data.num_workers,
                                        crop_spec(cfg.data, self.scenario.train))
        self.test_stream = BatchStream(self.scenario.test, self.device, cfg.data.num_workers,
                                       crop_spec(cfg.data, self.scenario.test))
        self.eval_batch = cfg.eval.batch_size  # halved where eval.fit_batch meets a batch too large for the GPU
        self.progress = Progress(progress and cfg.run.progress and dist.is_main())
        check_available(cfg.run.loggers)
        self.loggers: RunLoggers | None = None  # opened when fit starts (the main process only)
        self.state = RunState()
        self.ckpt_dir = run_dir / "checkpoints"
        self._heldout: HeldoutBatch | None = None

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        if self.cfg.run.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def phase_indices(self, phase: Phase, task, memory: Memory | RankedMemory | None = None) -> torch.Tensor:
        """The train-set rows of `phase.data`, with the memory rows from `memory` (default: the method's), as the
        method's `phase_rows` narrows them."""
        return self.method.phase_rows(phase, task, self.data_rows(phase, task, memory))

    def data_rows(self, phase: Phase, task,
                  bank: Memory | RankedMemory | StreamMemory | None = None) -> torch.Tensor:
        memory = self.method.memory if bank is None else bank
        if phase.data == "task":
            return task.train_idx
        if phase.data == "memory":
            return memory.indices()
        if phase.data == "task+memory":
            return torch.cat([task.train_idx, memory.indices()])
        if phase.data == "seen":
            return torch.cat([self.scenario[t].train_idx for t in range(task.index + 1)])
        raise ValueError(f"phase {phase.name}: unknown data '{phase.data}'")

    def extract(self, indices: torch.Tensor, fn, augment: bool = False, batch_size: int | None = None,
                generator: torch.Generator | None = None, shard: bool = True):
        """fn(images) for the train-set rows `indices`, in order, without gradients; sharded over ranks and
        gathered, so every rank gets the same result (`shard=False`: all rows on this process, nothing
        exchanged). `generator` draws the training augmentation (default: torch's global generator)."""
        bs = batch_size or self.cfg.eval.batch_size
        model = self.method.model
        was_training = model.training
        model.eval()
        shard = shard and self.world > 1
        mine = rank_share(indices, self.rank, self.world) if shard else indices
        counts = [len(rank_share(indices, r, self.world)) for r in range(self.world)]
        outs = []
        with torch.no_grad():
            batches = list(mine.split(bs))
            keys = None
            if augment and generator is not None and self.train_stream.spec.crops_train:
                # the crops drawn from the generator too, for all rows whatever the sharding
                drawn = torch.randint(0, 2**62, (len(indices),), generator=generator, device=generator.device).cpu()
                mine_keys = rank_share(drawn, self.rank, self.world) if shard else drawn
                keys = list(mine_keys.split(bs))
            for x_u8, _ in self.train_stream(batches, train=augment, keys=keys):
                x = self.augment.train(x_u8, generator) if augment else self.augment.test(x_u8)
                with self.autocast():
                    outs.append(fn(x).float())
        model.train(was_training)
        local = torch.cat(outs) if outs else torch.empty(0, device=self.device)
        if shard:
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
        for x_u8, idx in self.train_stream(list(mine.split(bs)), train=augment):
            yield (self.augment.train(x_u8) if augment else self.augment.test(x_u8)), idx

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (a no-op on one process)."""
        return dist.all_reduce_sum(t)

    def memory_banks(self, memory: Memory | RankedMemory, task) -> Iterator[tuple[Memory, TaskContext]]:
        """What a memory update fills: the global memory with this trainer as its context, or each bank of this
        process's emulated ranks with a RankContext of its own (docs/methods/dytox.md#memory-modes)."""
        if not isinstance(memory, RankedMemory):
            yield memory, self
            return
        for r in memory.local:  # lazily: each rank's context seeds its draws when its turn comes
            yield memory.banks[r], RankContext(self, stable_seed(self.cfg.run.seed, task.index, "memory", r))

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
    def open_loggers(self) -> None:
        """The loggers of run.loggers; a resumed run's drop what was written after its checkpoint."""
        names = [n for n in self.cfg.run.loggers if n != "jsonl"]
        if not names or not dist.is_main() or self.loggers is not None:
            return
        s = self.state
        resumed = s.task > 0 or s.phase > 0 or s.epoch > 0 or s.begun
        config = dataclasses.asdict(self.cfg)
        self.loggers = RunLoggers(names, self.run_dir, config, yaml.safe_dump(config, sort_keys=False),
                                  step_key(s.task, s.phase, s.epoch) + 1 if resumed else None,
                                  self.cfg.run.wandb_project, self.cfg.run.wandb_mode)

    def fit(self, optimizer_state: dict | None = None) -> dict:
        self.open_loggers()
        try:
            return self._fit(optimizer_state)
        finally:
            if self.loggers is not None:
                self.loggers.close()
                self.loggers = None

    def _fit(self, optimizer_state: dict | None = None) -> dict:
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
            if cfg.run.channels_last:  # what the task added (DER's new backbone) too
                self.method.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
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
            if isinstance(self.method.memory, RankedMemory):
                self.method.memory.synchronise()
            self.progress.message(f"task {task.index + 1}/{len(self.scenario)} · memory: "
                                  f"{len(self.method.memory)} exemplars ({time.perf_counter() - t0:.1f}s)")
        self.state.memory_updated = True

    def run_phase(self, task, p: int, phase: Phase, optimizer_state, task_t0: float) -> None:
        s, cfg = self.state, self.cfg
        self.method.setup_phase(phase, task)
        named = [(n, q) for n, q in self.method.model.named_parameters() if q.requires_grad]
        optimizer = build_optimizer(named, phase.optim, self.method.lr_scales(phase, task))
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        params = [q for _, q in named]
        indices = self.rank_rows(phase, task)
        n_batches = len(self.epoch_steps(task, p, phase, 0, indices))
        label = f"task {task.index + 1}/{len(self.scenario)} · {phase.name}"
        self.progress.start_phase(label, n_batches * max(phase.epochs - s.epoch, 0))
        for epoch in range(s.epoch, phase.epochs):
            torch.manual_seed(stable_seed(cfg.run.seed, task.index, p, epoch, self.rank))
            set_lr(optimizer, lr_at(phase.optim, phase.epochs, epoch))
            self.progress.start_epoch()
            loss = self.train_epoch(task, p, phase, epoch, indices, optimizer, params, label)
            dist.average_buffers(self.method.model)  # one set of BatchNorm statistics for every rank
            epoch_seconds, epoch_images_per_s = self.progress.epoch_seconds, self.progress.epoch_throughput
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
            if self.loggers is not None:
                self.loggers.epoch(step_key(task.index, p, s.epoch),
                                   {"task": task.index, "phase": phase.name, "epoch": s.epoch, "loss": loss,
                                    "lr": lr_at(phase.optim, phase.epochs, epoch),
                                    "seconds": epoch_seconds, "images_per_s": epoch_images_per_s})
                if periodic:
                    self.loggers.evaluation(step_key(task.index, p, s.epoch), s.periodic[-1] | res |
                                            {"kind": "periodic", "phase": phase.name, "epoch": s.epoch})
            self.progress.end_epoch(f"epoch {s.epoch}/{phase.epochs} · "
                                    f"lr {lr_at(phase.optim, phase.epochs, epoch):.2e}", extra)
            if s.epoch % cfg.train.checkpoint_every == 0 or s.epoch == phase.epochs:
                self.save_checkpoint(optimizer=optimizer)

    def n_ranks(self) -> int:
        """The ranks a global batch is shared among: the processes, or the emulated ranks of a RankedMemory."""
        memory = self.method.memory
        return memory.ranks if isinstance(memory, RankedMemory) else self.world

    def rank_rows(self, phase: Phase, task) -> list[tuple[int, torch.Tensor]]:
        """(rank, rows) of the phase for each rank this process trains as: its own rank with the phase's rows, or
        with a RankedMemory each local emulated rank with the task's rows and its own bank's. Every bank must
        give the same number of rows (the ranks step together)."""
        memory = self.method.memory
        if not isinstance(memory, RankedMemory):
            sets = [(self.rank, self.phase_indices(phase, task))]
        else:
            sizes = {len(self.phase_indices(phase, task, bank)) for bank in memory.banks}
            if len(sizes) > 1:
                raise TrainingError(f"task {task.index}: phase '{phase.name}': the memory banks give "
                                    f"{sorted(sizes)} rows; the emulated ranks need equal numbers to step together")
            sets = [(r, self.phase_indices(phase, task, memory.banks[r])) for r in memory.local]
        if len(sets[0][1]) == 0:
            raise TrainingError(f"task {task.index}: phase '{phase.name}' has no data ({phase.data} is empty)")
        return sets

    def epoch_steps(self, task, p: int, phase: Phase, epoch: int,
                    sets: list[tuple[int, torch.Tensor]]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """(this process's rows, the global batch size, the rows' positions in the epoch) of every step of an
        epoch, from `rank_rows`. A position is the row's place in the epoch's sequence of global batches (which
        seeds its random crop), the same whatever the number of processes.

        Every rank orders its own rows with the same generator of (seed, task, phase, epoch) and takes its share of
        each global batch (DeiT's RASampler over each rank's own dataset). A memory phase under a RankedMemory
        instead has every emulated rank iterate its whole bank in batches of batch_size / ranks, a global batch
        being one batch of every rank (DyTox's finetuning loader on each process's own memory)."""
        cfg, n_ranks = self.cfg, self.n_ranks()
        whole = isinstance(self.method.memory, RankedMemory) and phase.data == "memory"
        if n_ranks > 1 and phase.batch_size % n_ranks:
            raise ConfigError(f"memory.ranks: phase '{phase.name}' has batches of {phase.batch_size}, which do not "
                              f"split over {n_ranks} ranks")
        seed = stable_seed(cfg.run.seed, task.index, p, epoch, "order")
        per_rank, per_rank_positions, sizes = [], [], []
        for r, rows in sets:
            order = epoch_order(len(rows), seed, phase.shuffle, phase.repeats, phase.repeat_mode)
            if whole:
                per = phase.batch_size // n_ranks
                shares = global_batches(order, per, phase.drop_last)
                sizes = [len(b) * n_ranks for b in shares]
                positions = [i * phase.batch_size + r * per + torch.arange(len(b)) for i, b in enumerate(shares)]
            else:
                batches = global_batches(order, phase.batch_size, phase.drop_last)
                shares = [rank_share(b, r, n_ranks) for b in batches]
                sizes = [len(b) for b in batches]
                positions = [rank_share(i * phase.batch_size + torch.arange(len(b)), r, n_ranks)
                             for i, b in enumerate(batches)]
            per_rank.append([rows[b] for b in shares])
            per_rank_positions.append(positions)
        if cfg.train.max_batches:
            sizes = sizes[: cfg.train.max_batches]
        return [(torch.cat([rows[i] for rows in per_rank]), size, torch.cat([q[i] for q in per_rank_positions]))
                for i, size in enumerate(sizes)]

    def train_epoch(self, task, p, phase, epoch, indices, optimizer, params, label) -> float:
        cfg = self.cfg
        accum = cfg.train.grad_accum
        memory = self.method.memory
        memory_rows = memory.indices() if phase.data == "task+memory" else None
        streaming = memory.per_batch  # filled while the phase trains: drawn from afresh each step
        side = None
        if phase.memory_batch > 0 and not streaming:
            side = ([(self.rank, memory.indices())] if not isinstance(memory, RankedMemory) else
                    [(r, memory.banks[r].indices()) for r in memory.local])
            side = side if len(side[0][1]) else None
        if isinstance(memory, StreamMemory):
            memory.begin_epoch()
        loss_sum: torch.Tensor | float = 0.0
        n_steps = 0
        # random-resized crops: each image's draw from (the epoch's seed, its position in the epoch)
        crop_seed = stable_seed(cfg.run.seed, task.index, p, epoch, "crop")
        for step, (share, size, positions) in enumerate(self.epoch_steps(task, p, phase, epoch, indices)):
            rows = [m for m in share.tensor_split(accum) if len(m)] if len(share) else []
            parts = [q for q in positions.tensor_split(accum) if len(q)] if len(share) else []
            keys = [crop_keys(crop_seed, q) for q in parts]
            if streaming and phase.memory_batch > 0:  # the stream memory's slots; rows looked up after the draw
                side = [(self.rank, torch.arange(len(memory)))] if len(memory) else None
            draws = [self.memory_batch_rows(side, phase.memory_batch, len(rows),
                                            (cfg.run.seed, task.index, p, epoch, step, "memory-batch", *d))
                     for d in [()] + [(d,) for d in range(1, phase.memory_draws)]]
            side_seed = stable_seed(cfg.run.seed, task.index, p, epoch, step, self.rank, "memory-batch-crop")
            optimizer.zero_grad(set_to_none=True)
            shares = torch.zeros((), device=self.device)  # this rank's share of the step's loss
            step_batches: list[Batch] = []
            for k, (x_u8, idx) in enumerate(self.train_stream(rows, train=True, keys=keys)):
                batch = self.make_batch(x_u8, idx, memory_rows)
                batch.position = parts[k]
                step_batches.append(batch)
                side_batches = [self.memory_side_batch(draw[k], side_seed + k + 7919 * d, streaming)
                                for d, draw in enumerate(draws)]
                batch.memory, batch.memory_more = side_batches[0], [b for b in side_batches[1:] if b is not None]
                with self.autocast():
                    loss, logs = self.method.loss(batch, phase, task)
                (loss * (len(idx) * self.world / size)).backward()
                shares += loss.detach().float() * (len(idx) / size)
            # the step's loss stays on the device: it is read (and checked) every CHECK_EVERY steps and at the
            # epoch's end, before any checkpoint, not at every step
            step_loss = dist.average_gradients(params, extra=shares * self.world)  # sum of shares
            self.method.before_step(step_batches, phase, task)  # gradient surgery (GEM's projection ...)
            if phase.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, phase.grad_clip)
            optimizer.step()
            self.method.after_step(step_batches, phase, task, StepInfo(epoch, step, size))
            loss_sum, n_steps = loss_sum + step_loss, n_steps + 1
            self.progress.step(size, step_loss, f"epoch {epoch + 1}/{phase.epochs}")
            self.state.task_images += size
            if n_steps % CHECK_EVERY == 0:
                self.check_finite(loss_sum, task, phase, epoch)
        return self.check_finite(loss_sum, task, phase, epoch) / max(n_steps, 1)

    def check_finite(self, loss_sum: torch.Tensor | float, task, phase: Phase, epoch: int) -> float:
        """Stop on a NaN or infinite loss (the sum of the epoch's step losses so far: one host read); the sum."""
        value = float(loss_sum)
        if not math.isfinite(value):
            raise TrainingError(f"task {task.index} '{phase.name}' epoch {epoch + 1}: the loss is {value}; "
                                f"stopped, the last checkpoint is {self.ckpt_dir / 'last.pt'}")
        return value

    def memory_batch_rows(self, memory: torch.Tensor | list[tuple[int, torch.Tensor]] | None, size: int,
                          n_micro: int, seed_parts) -> list:
        """This process's memory rows for each micro-batch of one step: a seeded draw without replacement of
        `size` rows of the memory (all of it when smaller), the same global draw on every rank, of which each rank
        takes its share. `memory`: the memory's rows, or (emulated rank, its bank's rows) for the local ranks of
        a RankedMemory, each drawing from its own bank."""
        if memory is None or size <= 0:
            return [None] * n_micro
        sets = [(self.rank, memory)] if isinstance(memory, torch.Tensor) else memory
        n_ranks = self.world if isinstance(memory, torch.Tensor) else self.n_ranks()
        shares = []
        for r, rows in sets:
            g = torch.Generator().manual_seed(stable_seed(*seed_parts))
            shares.append(rank_share(rows[torch.randperm(len(rows), generator=g)[:size]], r, n_ranks))
        return list(torch.cat(shares).tensor_split(max(n_micro, 1)))[:n_micro]

    def memory_side_batch(self, mrows: torch.Tensor | None, seed: int, streaming: bool) -> Batch | None:
        """The rehearsal batch of the drawn memory rows (for a StreamMemory: drawn slots, which it carries in
        `slot`), augmented with crops of its own seed."""
        if mrows is None or not len(mrows):
            return None
        memory = self.method.memory
        slots = mrows if streaming else None
        if isinstance(memory, StreamMemory) and slots is not None:
            mrows = memory.rows[slots]
        mkeys = [crop_keys(seed, torch.arange(len(mrows)))]
        mx_u8, midx = next(iter(self.train_stream([mrows], train=True, keys=mkeys)))
        batch = self.make_batch(mx_u8, midx, None)
        batch.from_memory = torch.ones(len(midx), dtype=torch.bool, device=mx_u8.device)
        batch.slot = slots
        return batch

    def make_batch(self, x_u8, idx, memory_rows) -> Batch:
        y = self.scenario.train_labels[idx]
        x = self.augment.train(x_u8)
        if self.cfg.run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        soft = None
        if self.augment.mixes:
            x, soft, _ = mix_batch(x, to_device(y, x.device), self.method.seen, self.cfg.data.augment)
        from_memory = None
        if memory_rows is not None:
            from_memory = to_device(torch.isin(idx, memory_rows), x.device)
        # the labels live on the host with the scenario: copied without waiting for the device
        return Batch(x=x, y=to_device(y, x.device), task=to_device(self.scenario.task_of_label[y], x.device), index=idx,
                     soft=soft, from_memory=from_memory)

    def evaluate(self, upto: int) -> dict:
        while True:
            try:
                res = evaluate(self.method, self.scenario, upto, self.augment, self.test_stream, self.eval_batch,
                               self.cfg.eval.top_k, self.autocast)
                return res.to_dict()
            except torch.OutOfMemoryError:
                if not self.cfg.eval.fit_batch or self.world > 1 or self.eval_batch == 1:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.eval_batch //= 2
                self.progress.message(f"evaluation: out of memory; batches of {self.eval_batch} from now on")

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
        if self.loggers is not None:  # after the task's phases: keyed after every epoch of the task
            key = step_key(task.index, 99, 0)
            self.loggers.evaluation(key, {"kind": "task_end", **res, **info})
            self.loggers.matrices(key, {k: [e[k] for e in s.evals] for k in ("class_il", "task_il")})
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

