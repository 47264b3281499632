"""ER: experience replay with a memory filled by reservoir sampling while each task trains (Chaudhry et al. 2019,
"On Tiny Episodic Memories in Continual Learning"; the protocol of Buzzega et al. 2020, the Mammoth code).

Every step trains on the task's batch and a batch drawn from the memory (`batch.memory`, `method.memory_batch` rows,
default train.batch_size), concatenated into one forward pass and one cross-entropy, as Mammoth's `er.py`; after the
optimiser step the task's batch streams into the memory (`memory.selection: reservoir`, or
`class-balanced-reservoir`). `StreamReplay` is the shared base of the methods whose memory streams (DER, DER++):
it builds the StreamMemory, draws the memory batches and streams each step's rows, with what `stream_extras` keeps
of them. See docs/methods/er.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from ..data import distributed
from ..data.stream_memory import STREAM_POLICIES, StreamMemory, make_stream_memory
from ..errors import ConfigError
from .base import Batch, Method, MethodOptions, Phase, StepInfo, register_method
from .finetune import Finetune


@dataclass
class StreamReplayOptions(MethodOptions):
    memory_batch: int = 0  # memory rows drawn per step; 0: train.batch_size (Mammoth's minibatch_size)
    # all-classes: one linear head over all the scenario's classes from the first task, trained with a softmax over
    # all of them and (DER) storing logits over all of them, as Mammoth; growing: vitcl's head over the seen classes
    head: Literal["all-classes", "growing"] = "all-classes"

    def validate(self, key: str) -> None:
        if self.memory_batch < 0:
            raise ConfigError(f"{key}.memory_batch: expected a value >= 0, got {self.memory_batch}")


class StreamReplay(Finetune):
    """A Finetune whose memory streams: a StreamMemory of memory.size slots, one or more memory batches per step."""

    Options: ClassVar[type] = StreamReplayOptions
    opts: StreamReplayOptions
    memory: StreamMemory
    uses_memory = True
    hard_labels = True  # the memory batch carries hard labels only
    memory_draws = 1  # memory batches per step

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        m = cfg.memory
        if m.selection not in STREAM_POLICIES.names():
            raise ConfigError(f"memory.selection: {cfg.method.name} fills its memory while training; expected one "
                              f"of {', '.join(STREAM_POLICIES.names())}, got '{m.selection}'")
        if m.per_class:
            raise ConfigError("memory.per_class: a streamed memory has a fixed total; give memory.size instead")
        if m.size <= 0:
            raise ConfigError(f"memory.size: {cfg.method.name} needs a memory; expected a size > 0")
        if m.ranks != 1:
            raise ConfigError("memory.ranks: a streamed memory is one global memory; expected 1")

    def build_memory(self):
        return make_stream_memory(self.cfg.memory.size, self.cfg.memory.selection, self.cfg.run.seed)

    def phases(self, task):
        size = self.opts.memory_batch or self.cfg.train.batch_size
        return [Phase.from_train("train", "task", self.cfg.train, task.index, memory_batch=size,
                                 memory_draws=self.memory_draws)]

    def begin_task(self, task):
        if self.opts.head == "growing":
            super().begin_task(task)
        else:
            Method.begin_task(self, task)
            if not len(self.model.head.heads):
                self.model.head.add_task(self.scenario.num_classes).to(self.device)
        self._kept: list[dict[str, torch.Tensor]] = []

    def train_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits training uses: over all the scenario's classes (head all-classes) or the seen ones."""
        return self.model(x)

    def logits(self, x, task=None):
        if task is not None or self.opts.head == "growing":
            return self.model(x, task)
        return self.model(x)[:, : self.seen]  # evaluation scores the seen classes

    def stream_extras(self, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the memory stores with each streamed row (none for ER; DER: its logits)."""
        return {}

    def keep(self, batch: Batch, logits: torch.Tensor) -> None:
        """Called from loss(): keep this micro-batch's extras for after_step (before the optimiser changes them)."""
        self._kept.append({k: v.detach() for k, v in self.stream_extras(batch, logits).items()})

    def after_step(self, batches: list[Batch], phase: Phase, task, step: StepInfo) -> None:
        kept, self._kept = self._kept, []
        labels = self.scenario.train_labels
        rows = torch.cat([b.index for b in batches])  # on the host
        positions = torch.cat([b.position for b in batches if b.position is not None])
        extras = {k: torch.cat([e[k] for e in kept]) for k in kept[0]} if kept and kept[0] else {}
        if distributed.world_size() > 1:  # every process streams the whole global batch, in position order
            parts = distributed.all_gather_objects((rows, positions))
            counts = [len(r) for r, _ in parts]
            extras = {k: distributed.all_gather_rows(v, counts) for k, v in extras.items()}
            rows, positions = torch.cat([r for r, _ in parts]), torch.cat([p for _, p in parts])
        y = labels[rows]
        self.memory.observe(rows, y, self.scenario.task_of_label[y], positions, extras)


@register_method("er")
class ExperienceReplay(StreamReplay):
    def loss(self, batch, phase, task):
        if batch.memory is None:
            return F.cross_entropy(self.train_logits(batch.x), batch.y), {}
        logits = self.train_logits(torch.cat([batch.x, batch.memory.x]))
        return F.cross_entropy(logits, torch.cat([batch.y, batch.memory.y])), {}
