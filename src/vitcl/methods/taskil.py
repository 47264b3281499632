"""What the task-incremental methods share (single, multi-head, piggyback, rkr, mask-rkr): a backbone with one head
per task, inference conditioned on the task id, a loss over the task's own classes, and a parameter count in which
binary masks cost 1/32 of a parameter. Each method says which parameters task t trains (`trainable`).
"""
from __future__ import annotations

import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..models import GrowingHead, create_backbone
from ..models.surgery import (
    LayerRule,
    TaskParams,
    apply_surgery,
    as_rules,
    count_parameters,
    freeze_task,
    parameter_cost,
    set_task,
    slot_parameters,
)
from ..models.surgery import add_task as add_task_slots
from ..models.timm_backbone import timm_family
from .base import Batch, Method, MethodOptions, ParamCount, Phase
from .losses import soft_cross_entropy, task_targets


@dataclass
class TaskILOptions(MethodOptions):
    input_size: int | None = None  # resize each batch to this size on the device first (CIFAR at 224, as the code)


@dataclass
class SurgeryOptions(TaskILOptions):
    layers: list[str | LayerRule] | None = None  # layers to wrap; default: the papers' choice per backbone
    bn: Literal["task", "shared", "frozen"] = "task"  # BatchNorm statistics: per task, shared by all, or frozen


TO = TypeVar("TO", bound=TaskILOptions)
SO = TypeVar("SO", bound=SurgeryOptions)


class TaskILModel(nn.Module):
    """backbone -> head of the given task. With `frozen_backbone` the backbone stays in eval mode (BatchNorm
    statistics and dropout) whatever train() says, so an evaluation pass cannot switch it back on."""

    def __init__(self, backbone: nn.Module, input_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = GrowingHead(typing.cast(int, backbone.num_features))
        self.input_size = input_size
        self.frozen_backbone = False

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.input_size
        if s and tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        return x

    def features(self, x: torch.Tensor, task: int) -> torch.Tensor:
        set_task(self.backbone, task)
        return self.backbone(self.resize(x))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.head(self.features(x, task), task)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self


class TaskILMethod(Method[TO]):
    model: TaskILModel

    """Base of the task-IL methods: subclasses give `trainable(task)` and may `prepare` the backbone (surgery)."""

    settings = frozenset({"task-il"})
    task_conditioned = True

    def build_backbone(self) -> nn.Module:
        size = self.opts.input_size or self.scenario.train.image_size
        return create_backbone(self.cfg.model, size, self.scenario.train.channels)

    def build_model(self) -> nn.Module:
        backbone = self.build_backbone()
        n0 = self.scenario[0].num_classes
        # one backbone with one head: what the papers' percentages are relative to
        self.reference = float(sum(p.numel() for p in backbone.parameters()) + backbone.num_features * n0 + n0)
        self.prepare(backbone)
        return TaskILModel(backbone, self.opts.input_size)

    def prepare(self, backbone: nn.Module) -> None:
        """Change the backbone before training (parameter surgery)."""

    def begin_task(self, task) -> None:
        super().begin_task(task)
        self.model.head.add_task(task.num_classes).to(self.device)

    def trainable(self, task) -> Iterable[nn.Parameter]:
        raise NotImplementedError

    def setup_phase(self, phase: Phase, task) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.trainable(task):
            p.requires_grad_(True)
        self.model.train()

    def logits(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        return self.model(x, self.task_index if task is None else task)

    def loss(self, batch: Batch, phase: Phase, task) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy over the task's own classes (task-IL)."""
        logits = self.logits(batch.x, task.index)
        target, soft = task_targets(batch.y, batch.soft, task.offset, task.end)
        if soft is not None:
            return soft_cross_entropy(logits, soft), {}
        return F.cross_entropy(logits, target, label_smoothing=self.cfg.data.augment.label_smoothing), {}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x, max(self.task_index, 0))

    def count_parameters(self) -> ParamCount:
        """Total, and what the current task learns (also after end_task, when its masks are frozen as bool)."""
        model = self.inference_modules()
        learns = {id(p) for p in self.trainable(self.scenario[self.task_index])} if self.task_index >= 0 else set()
        return ParamCount(count_parameters(model),
                          sum(parameter_cost(n, p) for n, p in model.named_parameters() if id(p) in learns))

    def reference_count(self) -> float:
        return self.reference


class SurgeryMethod(TaskILMethod[SO]):
    """Piggyback, RKR and Mask-RKR: the backbone's layers are wrapped (models/surgery.py); task t trains its slot
    in every wrapped layer and its head; the pretrained weights stay frozen."""

    def task_params(self) -> TaskParams:
        raise NotImplementedError

    def prepare(self, backbone: nn.Module) -> None:
        name = self.cfg.model.name
        if name == "timm":
            name = timm_family(self.cfg.model.arch)
        rules = as_rules(self.opts.layers, name)
        apply_surgery(backbone, rules, self.task_params(), self.opts.bn)

    def begin_task(self, task) -> None:
        super().begin_task(task)
        add_task_slots(self.model.backbone)

    def trainable(self, task) -> Iterable[nn.Parameter]:
        return [*slot_parameters(self.model.backbone, task.index), *self.model.head.heads[task.index].parameters()]

    def end_task(self, task) -> None:
        freeze_task(self.model.backbone, task.index)  # its masks become bool: 4x smaller in memory and checkpoints
