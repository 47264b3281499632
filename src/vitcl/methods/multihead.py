"""Multi-Head: one shared backbone and one head per task (task-IL). By default the backbone is the frozen
pretrained one (the Mask-RKR paper's baseline); `backbone: first-task` trains it with the first task only (the public
code's MultiHead2); `backbone: every-task` fine-tunes it on each task in turn, so old tasks' heads see a drifted
backbone (forgetting). A backbone that is not trained stays in eval mode (BatchNorm statistics, dropout)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import register_method
from .taskil import TaskILMethod, TaskILOptions


@dataclass
class MultiHeadOptions(TaskILOptions):
    backbone: Literal["frozen", "first-task", "every-task"] = "frozen"


@register_method("multi-head")
class MultiHead(TaskILMethod[MultiHeadOptions]):

    def trains_backbone(self, task) -> bool:
        mode = self.opts.backbone
        return mode == "every-task" or (mode == "first-task" and task.index == 0)

    def trainable(self, task):
        params = list(self.model.head.heads[task.index].parameters())
        if self.trains_backbone(task):
            params += list(self.model.backbone.parameters())
        return params

    def setup_phase(self, phase, task) -> None:
        self.model.frozen_backbone = not self.trains_backbone(task)
        super().setup_phase(phase, task)

    def end_task(self, task) -> None:
        self.model.frozen_backbone = True  # evaluation (and the next task, unless it trains it) sees it frozen
