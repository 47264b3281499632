"""Fine-tuning: the lower bound. A backbone and a linear head that grows with each task; no memory."""
from __future__ import annotations

import torch
from torch import nn

from ..models import GrowingHead, create_backbone
from .base import Method, MethodOptions, register_method


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, head: GrowingHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        return self.head(self.backbone(x), task)


@register_method("finetune")
class Finetune(Method[MethodOptions]):
    def build_model(self) -> nn.Module:
        backbone = create_backbone(self.cfg.model, self.scenario.train.image_size, self.scenario.train.channels)
        return Classifier(backbone, GrowingHead(backbone.num_features))

    def begin_task(self, task):
        super().begin_task(task)
        self.model.head.add_task(task.num_classes).to(self.device)

    def logits(self, x, task=None):
        return self.model(x, task)

    def embed(self, x):
        return self.model.backbone(x)
