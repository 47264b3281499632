"""Classifier heads that grow with the tasks. Logits of all seen classes are concatenated in task order."""
from __future__ import annotations

import typing

import torch
from torch import nn


class TaskHead(nn.Module):
    """One task's classifier: optional LayerNorm, then Linear over that task's classes."""

    def __init__(self, in_features: int, num_classes: int, norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(in_features) if norm else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class GrowingHead(nn.Module):
    """One head per task over a shared embedding; the concatenation is a linear over all seen classes."""

    def __init__(self, in_features: int, norm: bool = False):
        super().__init__()
        self.in_features = in_features
        self.norm = norm
        self.heads = nn.ModuleList()

    def add_task(self, num_classes: int) -> TaskHead:
        head = TaskHead(self.in_features, num_classes, self.norm)
        if len(self.heads):
            head.to(next(self.heads[0].parameters()).device)
        self.heads.append(head)
        return head

    @property
    def num_classes(self) -> int:
        return sum(typing.cast(TaskHead, h).fc.out_features for h in self.heads)

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        if task is not None:
            return self.heads[task](x)
        return torch.cat([h(x) for h in self.heads], dim=1)
