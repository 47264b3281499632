"""LwF (Li & Hoiem, ECCV 2016 / TPAMI 2017), class-incremental with a growing head and no memory
(docs/methods/lwf.md).

Per task t >= 1, the frozen copy of the model taken before the new head is added is the teacher; the loss of a
batch is
    CE(logits over the task's own classes, y - offset)  +  lamb * KD_T(student's old-class logits, teacher's)
with KD_T = -mean_i sum_c softmax(teacher/T)_c log softmax(student/T)_c over all old classes at once
(`losses.soft_distillation`), T = 2 and lamb = 1 (the paper's values; FACIL's defaults). `ce_scope: all` puts the
cross-entropy over every seen class instead; `freeze_old_heads` keeps the old classifiers out of the optimiser
(FACIL's choice when it has no exemplars).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from .base import MethodOptions, register_method
from .distilled import WithTeacher
from .losses import soft_distillation, task_cross_entropy


@dataclass
class LwFOptions(MethodOptions):
    lamb: float = 1.0  # the distillation's weight (paper, FACIL: 1; PyCIL's lwf.py: 3)
    temperature: float = 2.0
    ce_scope: Literal["task", "all"] = "task"  # task: CE over the new classes only (FACIL and PyCIL without memory)
    freeze_old_heads: bool = False  # true: FACIL's optimiser without exemplars (old heads not updated)

    def validate(self, key: str) -> None:
        if self.lamb < 0:
            raise ConfigError(f"{key}.lamb: expected a weight >= 0, got {self.lamb}")
        if self.temperature <= 0:
            raise ConfigError(f"{key}.temperature: expected a positive temperature, got {self.temperature}")


@register_method("lwf")
class LwF(WithTeacher):
    Options = LwFOptions
    opts: LwFOptions
    settings = frozenset({"class-il"})

    def setup_phase(self, phase, task):
        super().setup_phase(phase, task)
        if self.opts.freeze_old_heads:
            for head in list(self.model.head.heads)[:-1]:
                head.requires_grad_(False)

    def loss(self, batch, phase, task):
        o = self.opts
        logits = self.model(batch.x)
        ce = task_cross_entropy(logits, batch, task.offset, o.ce_scope)
        logs = {"ce": ce.detach()}
        if self.teacher is None:
            return ce, logs
        with torch.no_grad():
            old = self.teacher(batch.x)
        kd = soft_distillation(logits[:, : task.offset], old, o.temperature)
        logs["kd"] = kd.detach()
        return ce + o.lamb * kd, logs
