"""The method interface. A method builds its model, grows it per task, lists its phases and gives the loss of
a batch. The engine owns the loop, the data, the optimiser and evaluation; a method never writes a loop.

Lifecycle per task t (the engine calls, in order):
    begin_task(task)            grow the model, take a teacher, reset per-task modules (deterministic shapes)
    for phase in phases(task):
        [update_memory(task, ctx)   once, before the first phase whose data is "memory", else after the last]
        setup_phase(phase, task)    freeze / unfreeze, train / eval modes
        phase_rows(phase, task, rows)  the rows of phase.data it trains on (a held-out split, a balanced subset)
        loss(batch, phase, task)    per batch -> (scalar loss, {name: tensor} to log; the engine decides when to
                                    read them, as each read is a host-device sync)
        before_step(batches, ...)   per step, gradients ready: change them (GEM's projection)
        after_step(batches, ...)    per step, after the optimiser: update a per-batch memory (reservoir)
    consolidate(task, ctx)      after the phases and the memory update: estimate what to protect (importance)
    end_task(task)
Evaluation calls scores(x) (class-IL, all seen classes: by default logits(x) and no extra scorer) or
logits(x, task=t) for task-conditioned methods. A method that also classifies otherwise (iCaRL's nearest mean of
exemplars) names its extra scorers in extra_scorers() and returns them from scores(x); the evaluator reports
each one's class-IL and task-IL accuracies from the same pass.

`ctx` (a `TaskContext`: the engine) offers, all without gradients unless the caller enables them:
    ctx.extract(indices, fn, augment=False)   fn(images) for train-set rows, in order, gathered over ranks
    ctx.batches(indices, augment=False)       (images, rows) batches of this rank's share of the rows
    ctx.reduce_sum(tensor)                    sum over ranks, in place (a no-op on one process)
    ctx.memory_banks(memory, task)            the (bank, ctx) pairs a memory update fills (one, or one per
                                              emulated rank this process holds: DyTox's distributed memory)
`check(cfg)` runs when a run's config is built, before any data is read: the checks of the whole config that a
method needs (the setting, the backbone it is built around, a data option it depends on).
A phase with `memory_batch > 0` gets, with every batch of its data, an independent batch of that many rows drawn
from the rehearsal memory (dark-experience / LVT style) in `batch.memory`, once the memory holds anything.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar, get_args

import torch
from torch import nn

from ..config import OptimConfig
from ..data import distributed
from ..data.memory import Memory, RankedMemory, make_budget, make_memory
from ..data.stream_memory import StreamMemory
from ..errors import ConfigError
from ..registry import Registry
from .losses import classification_loss

if TYPE_CHECKING:
    from ..config import Config, TrainConfig
    from ..data.scenario import Scenario, Task

METHODS: Registry = Registry("method")


def register_method(name: str):
    def add(cls):
        cls.name = name
        return METHODS.register(name)(cls)

    return add


# the rows a phase trains on; "seen": every seen task's full data (joint training)
PhaseData = Literal["task+memory", "task", "memory", "seen"]


@dataclass
class Phase:
    """One optimisation phase of a task: which data, how long, in what batches, and the optimiser and schedule
    (`optim`; `phase.lr`, `phase.schedule` ... read through to it)."""

    name: str
    data: PhaseData
    epochs: int
    optim: OptimConfig
    batch_size: int = 128
    shuffle: bool = True
    drop_last: bool = False
    repeats: int = 1  # repeated augmentation: each index appears this many times per epoch
    # extend: the epoch grows `repeats` times | deit: it keeps its length (RASampler)
    repeat_mode: Literal["extend", "deit"] = "extend"
    memory_batch: int = 0  # >0: draw this many memory rows alongside every batch, into batch.memory
    memory_draws: int = 1  # independent memory batches per step: batch.memory, then batch.memory_more (DER++: 2)

    def __getattr__(self, name: str) -> Any:
        optim = self.__dict__.get("optim")
        if optim is not None and name in _OPTIM_FIELDS:
            return getattr(optim, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def from_train(cls, name: str, data: PhaseData, train: TrainConfig, task_index: int, **changes: Any) -> Phase:
        """The phase the `train` section describes, with `changes` to it or its optimiser settings; the first
        task may have its own epochs and lr."""
        epochs = train.first_task_epochs if task_index == 0 and train.first_task_epochs else train.epochs
        lr = train.first_task_lr if task_index == 0 and train.first_task_lr is not None else train.lr
        optim_changes = {k: changes.pop(k) for k in list(changes) if k in _OPTIM_FIELDS}
        optim = replace(train.optim(), **{"lr": train.scaled_lr(lr), **optim_changes})
        phase = cls(name=name, data=data, epochs=epochs, optim=optim, batch_size=train.batch_size,
                    drop_last=train.drop_last)
        return replace(phase, **changes)


_OPTIM_FIELDS = frozenset(f.name for f in fields(OptimConfig))


class TaskContext(Protocol):
    """What the engine offers a method's memory and consolidation hooks."""

    def extract(self, indices: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], augment: bool = False,
                batch_size: int | None = None) -> torch.Tensor:
        """fn(images) for the train-set rows `indices`, in order, without gradients; the same on every rank."""
        ...

    def batches(self, indices: torch.Tensor, augment: bool = False,
                batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised images, train-set rows) for this rank's share of `indices`, in order."""
        ...

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (a no-op on one process)."""
        ...

    def memory_banks(self, memory: Memory | RankedMemory, task: Task) -> Iterator[tuple[Memory, TaskContext]]:
        """The banks this process fills at a memory update, each with the context to compute it in: the memory
        itself with this context, or for a RankedMemory each local emulated rank's bank with a context of that
        rank (all candidates on this process, training augmentation drawn from a generator of (seed, task, rank))."""
        ...


@dataclass
class Batch:
    x: torch.Tensor  # augmented, normalised images (B, C, H, W)
    y: torch.Tensor  # labels (class-order positions)
    task: torch.Tensor  # task index of each sample
    index: torch.Tensor  # row in the scenario's train set (to look up memory extras), on the host
    soft: torch.Tensor | None = None  # MixUp/CutMix soft targets over the seen classes, when mixing is on
    from_memory: torch.Tensor | None = None  # bool mask: sample comes from the rehearsal memory
    memory: Batch | None = None  # a separate rehearsal batch, for phases with memory_batch > 0
    memory_more: list[Batch] = field(default_factory=list)  # further independent draws (phase.memory_draws > 1)
    slot: torch.Tensor | None = None  # a StreamMemory's slots of a rehearsal batch's rows (their stored extras)
    # each row's place in the epoch's sequence of global batches (CPU; the same whatever the number of processes)
    position: torch.Tensor | None = None


def require_constant_lr(cfg, step: str) -> None:
    """For methods with a step of their own at the phase's lr (FDR's memory step, HAL's temporary step): Mammoth's
    recipe, a constant schedule without warm-up."""
    t = cfg.train
    if t.schedule != "constant" or t.warmup_epochs or t.first_task_lr is not None:
        raise ConfigError(f"train.schedule: {cfg.method.name}'s {step} runs at the phase's lr; expected a constant "
                          f"schedule without warm-up (Mammoth's recipe)")


@dataclass(frozen=True)
class StepInfo:
    """Where a training step is: its 0-based epoch and step within the phase, and its global batch size."""

    epoch: int
    step: int
    global_batch: int


@dataclass
class ParamCount:
    total: float  # float: binary masks count 1/32 of a parameter
    trainable: float


@dataclass
class MethodOptions:
    name: str = ""  # the registered method; the config sets it, Method fills it in when empty


O = TypeVar("O", bound=MethodOptions)


class Method(Generic[O]):
    """`class M(Method[MOptions])` declares M's options: `M.Options`, the dataclass the config builder validates
    the method section with (inherited, or set explicitly, otherwise), and the type of `self.opts`."""

    name: ClassVar[str] = ""  # set by @register_method
    Options: ClassVar[type] = MethodOptions
    settings: ClassVar[frozenset[str]] = frozenset({"class-il", "task-il"})
    task_conditioned: ClassVar[bool] = False  # True: inference needs the task id (task-IL only)
    uses_memory: ClassVar[bool] = False
    hard_labels: ClassVar[bool] = False  # True: the losses take hard labels, so MixUp/CutMix are refused
    opts: O

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Options" in vars(cls):
            return
        for base in vars(cls).get("__orig_bases__", ()):
            for arg in get_args(base):
                if isinstance(arg, type) and issubclass(arg, MethodOptions):
                    cls.Options = arg

    def __init__(self, cfg: Config, scenario: Scenario, device: torch.device):
        self.cfg, self.opts, self.scenario, self.device = cfg, cfg.method, scenario, device
        if not self.opts.name:
            self.opts.name = self.name
        self.seen = 0  # classes seen so far, after begin_task
        self.task_index = -1
        self.model: nn.Module = self.build_model().to(device)
        self.memory: Memory | RankedMemory | StreamMemory = self.build_memory()

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Checks of the whole config, before any work (subclasses extend it and call super())."""
        if cfg.data.setting not in cls.settings:
            raise ConfigError(f"data.setting: method '{cfg.method.name}' supports {sorted(cls.settings)}, "
                              f"not '{cfg.data.setting}'")
        a = cfg.data.augment
        if cls.hard_labels and (a.mixup_alpha > 0 or a.cutmix_alpha > 0):
            raise ConfigError(f"data.augment.mixup_alpha: {cfg.method.name} trains on hard labels; set mixup_alpha "
                              "and cutmix_alpha to 0")

    # ------------------------------------------------------------------ to implement
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_memory(self) -> Memory | RankedMemory | StreamMemory:
        """The memory filled at task ends (a budget and a selection rule); methods whose memory streams
        (reservoir) return a StreamMemory."""
        cfg = self.cfg
        budget = make_budget(cfg.memory.size, cfg.memory.per_class) if self.uses_memory else make_budget(0, 0)
        return make_memory(budget, cfg.memory.selection, cfg.run.seed, cfg.memory.ranks, distributed.rank(),
                           distributed.world_size())

    def begin_task(self, task: Task) -> None:
        self.task_index, self.seen = task.index, task.end

    def phases(self, task: Task) -> list[Phase]:
        data: PhaseData = "task+memory" if self.uses_memory else "task"
        return [Phase.from_train("train", data, self.cfg.train, task.index)]

    def phase_rows(self, phase: Phase, task: Task, rows: torch.Tensor) -> torch.Tensor:
        """The train-set rows the phase trains on, given those of `phase.data` (a held-out split, a balanced
        subset); called once per phase (again on resume), after setup_phase and after the memory update that
        precedes a "memory" phase. It must be a function of the method's state and the seed."""
        return rows

    def setup_phase(self, phase: Phase, task: Task) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.model.train()

    def loss(self, batch: Batch, phase: Phase, task: Task) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.logits(batch.x)
        loss = classification_loss(logits, batch)
        return loss, {}

    def lr_scales(self, phase: Phase, task: Task) -> dict[str, float]:
        """{parameter-name prefix: factor of the phase's lr} for parameters trained slower or faster (SLCA's
        backbone at 1/100 of the classifier's rate); the longest matching prefix wins, the rest run at phase.lr."""
        return {}

    def before_step(self, batches: list[Batch], phase: Phase, task: Task) -> None:
        """After the step's gradients are summed over micro-batches and averaged over ranks, before clipping and
        the optimiser step: where a method changes the gradients (GEM's and A-GEM's projections)."""

    def after_step(self, batches: list[Batch], phase: Phase, task: Task, step: StepInfo) -> None:
        """After the optimiser step, with the step's micro-batches of this process (each with its rows'
        `position`): where a memory updated per batch takes its rows (reservoir sampling)."""

    def logits(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def extra_scorers(self) -> tuple[str, ...]:
        """Names of the scorers that evaluation reports beside the main scores (fixed for a run)."""
        return ()

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What evaluation scores x with: the main class-IL scores (B, seen) and, per name of extra_scorers(),
        logits-like scores (B, seen) of another classifier (higher is better). One call per test batch, so a
        method can share one forward pass between them."""
        return self.logits(x), {}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features for memory selection (herding)."""
        raise NotImplementedError

    def update_memory(self, task: Task, ctx: TaskContext) -> None:
        """Add the task's exemplars, selected on what the selector needs (embeddings, or the scores of
        `candidate_outputs`), with the per-row extras that `candidate_outputs` gives. A StreamMemory is filled
        while the task trains (`after_step`), not here."""
        if not self.memory.enabled or isinstance(self.memory, StreamMemory):
            return
        labels = self.scenario.train_labels[task.train_idx]
        needs = self.memory.selector.needs
        for bank, bank_ctx in ctx.memory_banks(self.memory, task):  # one, or each local rank's with its ctx
            feats, extras = self.candidate_outputs(task, bank_ctx, labels, scores=needs == "scores")
            if needs == "embedding":
                feats = bank_ctx.extract(task.train_idx, self.embed, augment=self.cfg.memory.features_augment)
            bank.add(task.train_idx, labels, feats, self.seen, extras=extras)

    def candidate_outputs(self, task: Task, ctx: TaskContext, labels: torch.Tensor,
                          scores: bool) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """For the task's candidates (task.train_idx, labels): their selection scores when `scores` (higher is
        kept first; here the softmax probability of the own label) and the tensors to store with each exemplar
        (`memory.lookup` returns them by row; here none). One hook, so that both can come from one extraction;
        `ctx.extract(indices, fn)` runs fn on test-transformed images (no grad)."""
        if not scores:
            return None, {}
        return true_class_confidence(ctx.extract(task.train_idx, self.logits), labels), {}

    def consolidate(self, task: Task, ctx: TaskContext) -> None:
        """After the task's phases and memory update: estimate what to protect for later tasks."""

    def end_task(self, task: Task) -> None:
        pass

    # ------------------------------------------------------------------ state and accounting
    def extra_state(self) -> dict:
        """Method state beyond the model and memory (teachers, importance weights ...)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "memory": self.memory.state_dict(), "extra": self.extra_state(),
                "task_index": self.task_index, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.memory.load_state_dict(state["memory"])
        self.load_extra_state(state["extra"])
        self.task_index, self.seen = state["task_index"], state["seen"]

    def compile_modules(self) -> list[nn.Module]:
        """What `run.compile` compiles (once per run): the model's `compile_modules()` where it has them (the parts
        that do not change per task), else the whole model."""
        parts = getattr(self.model, "compile_modules", None)
        return parts() if callable(parts) else [self.model]

    def inference_modules(self) -> nn.Module:
        """What the parameter count covers: the model used at test time (training-only heads excluded)."""
        return self.model

    def reference_count(self) -> float | None:
        """Parameters of the plain model the method grows from (one backbone with one head), for the percentage
        growth that `vitcl params` prints; None where it does not apply."""
        return None

    def count_parameters(self) -> ParamCount:
        params = list(self.inference_modules().parameters())
        return ParamCount(float(sum(p.numel() for p in params)),
                          float(sum(p.numel() for p in params if p.requires_grad)))


def true_class_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax probability of each row's own label (labels index the logits' columns)."""
    return logits.float().softmax(dim=1).gather(1, labels.to(logits.device)[:, None]).squeeze(1)
