"""What the distillation baselines share. `WithTeacher` (LwF, iCaRL, and the others through `Distilled`): a backbone
and a growing linear head over all seen classes (as finetune) and a frozen teacher, the model as it was before the
task's new classes were added (t >= 1), kept in checkpoints. `Distilled` (WA, BiC, E2E) adds the rehearsal memory,
the distillation temperature and the first task's own milestones and weight decay, as the reference recipes train
it (docs/methods/wa.md, bic.md, e2e.md)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from .base import MethodOptions, Phase, PhaseData
from .finetune import Finetune


@dataclass
class DistilledOptions(MethodOptions):
    temperature: float = 2.0  # T of the distillation (2 in the WA, BiC and E2E papers)
    first_task_milestones: list[int] | None = None  # the first task's lr milestones; None: train.milestones
    first_task_weight_decay: float | None = None  # None: train.weight_decay

    def validate(self, key: str) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{key}.temperature: expected a positive temperature, got {self.temperature}")
        if self.first_task_weight_decay is not None and self.first_task_weight_decay < 0:
            raise ConfigError(f"{key}.first_task_weight_decay: expected a value >= 0, "
                              f"got {self.first_task_weight_decay}")


class WithTeacher(Finetune):
    """Finetune with a frozen copy of the model taken at the start of every task t >= 1."""

    def __init__(self, cfg, scenario, device):
        self.teacher: nn.Module | None = None
        super().__init__(cfg, scenario, device)

    def begin_task(self, task):
        if task.index > 0:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        super().begin_task(task)

    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict() if self.teacher is not None else None}

    def load_extra_state(self, state: dict) -> None:
        if state.get("teacher") is not None and self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])


class Distilled(WithTeacher):
    """WithTeacher and a rehearsal memory; subclasses give the loss and the post-hoc steps."""

    uses_memory = True
    settings = frozenset({"class-il", "task-il"})
    opts: Any

    def train_phase(self, task, name: str = "train", data: PhaseData = "task+memory", **changes) -> Phase:
        """A phase of the `train` section; on the first task with its own milestones and weight decay."""
        o = self.opts
        if task.index == 0 and o.first_task_milestones is not None:
            changes.setdefault("milestones", list(o.first_task_milestones))
        if task.index == 0 and o.first_task_weight_decay is not None:
            changes.setdefault("weight_decay", o.first_task_weight_decay)
        return Phase.from_train(name, data, self.cfg.train, task.index, **changes)

    def phases(self, task):
        return [self.train_phase(task)]
