"""SimpleCIL (Zhou et al., "Revisiting class-incremental learning with pre-trained models: generalizability and
adaptivity are all you need", IJCV 2024; docs/methods/simplecil.md): no training at all. The pretrained backbone
stays frozen; after each task, every new class's prototype is the mean embedding of its training images (test
transform, no augmentation), and an image is scored by the cosine similarity of its embedding to each prototype.
"""
from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from ..models import create_backbone
from .base import Method, MethodOptions, ParamCount, register_method
from .prototypes import Prototypes, class_feature_means


class FrozenBackbone(nn.Module):
    """A backbone that never trains: its parameters are frozen and it stays in eval mode."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


@register_method("simplecil")
class SimpleCIL(Method[MethodOptions]):
    settings = frozenset({"class-il"})

    def __init__(self, cfg, scenario, device):
        super().__init__(cfg, scenario, device)
        self.prototypes = Prototypes()

    def build_model(self) -> nn.Module:
        return FrozenBackbone(create_backbone(self.cfg.model, self.scenario.train.image_size,
                                              self.scenario.train.channels))

    def phases(self, task):
        return []  # nothing trains

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def consolidate(self, task, ctx):
        labels = self.scenario.train_labels[task.train_idx]
        classes, means = class_feature_means(ctx, task.train_idx, labels, self.embed)
        self.prototypes.set(classes, means, task.end)

    def logits(self, x, task=None):
        return self.prototypes(self.embed(x))

    def extra_state(self) -> dict:
        return {"prototypes": self.prototypes.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.prototypes.load_state_dict(state["prototypes"], self.device)

    def count_parameters(self) -> ParamCount:
        """The frozen backbone plus the prototype table (the classifier's weights: seen classes x d)."""
        c = super().count_parameters()
        return ParamCount(c.total + self.seen * int(cast(Any, self.model).backbone.num_features), c.trainable)
