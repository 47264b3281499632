"""Single: one fine-tuned copy of the backbone (and a head) per task; the upper bound in accuracy and the most
parameters (+900% at 10 tasks). Each copy starts from the pretrained backbone (`init: previous`: from the copy of
the task before)."""
from __future__ import annotations

import copy
import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..models import GrowingHead
from .base import register_method
from .taskil import TaskILMethod, TaskILModel, TaskILOptions


class SingleModel(TaskILModel):
    """One backbone per task in `backbones`; `backbone` (not a submodule) is the initial copy."""

    def __init__(self, backbone: nn.Module, input_size: int | None = None):
        nn.Module.__init__(self)
        self.backbones = nn.ModuleList()
        self.head = GrowingHead(typing.cast(int, backbone.num_features))
        self.input_size = input_size
        self.frozen_backbone = False

    def features(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.backbones[task](self.resize(x))


@dataclass
class SingleOptions(TaskILOptions):
    init: Literal["pretrained", "previous"] = "pretrained"


@register_method("single")
class Single(TaskILMethod[SingleOptions]):
    model: SingleModel

    def build_model(self) -> nn.Module:
        model = typing.cast(TaskILModel, super().build_model())
        self.initial: nn.Module = model.backbone  # kept outside the model: not counted, not saved
        return SingleModel(self.initial, self.opts.input_size)

    def begin_task(self, task) -> None:
        super().begin_task(task)
        previous = self.opts.init == "previous" and len(self.model.backbones)
        src: nn.Module = self.model.backbones[-1] if previous else self.initial
        self.model.backbones.append(copy.deepcopy(src).to(self.device))

    def trainable(self, task):
        return [*self.model.backbones[task.index].parameters(), *self.model.head.heads[task.index].parameters()]

    def setup_phase(self, phase, task) -> None:
        super().setup_phase(phase, task)
        for i, b in enumerate(self.model.backbones):
            b.train(i == task.index)
