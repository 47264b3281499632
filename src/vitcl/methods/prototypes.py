"""Class prototypes on a (mostly frozen) backbone, shared by the methods that classify by them (SimpleCIL, APER,
EASE) or need per-class feature statistics (SLCA, RanPAC): means over a task's training images, test-transformed,
and a cosine classifier whose weight rows are those means (docs/methods/simplecil.md)."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .base import TaskContext


def class_feature_means(ctx: TaskContext, indices: torch.Tensor, labels: torch.Tensor,
                        embed: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes (K,) sorted, means (K, d)): the plain mean of `embed` over each class's rows of the train set."""
    feats = ctx.extract(indices, lambda x: embed(x).float().flatten(1))
    return per_class_means(feats, labels.to(feats.device))


def per_class_means(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    classes, pos, counts = labels.unique(sorted=True, return_inverse=True, return_counts=True)
    sums = feats.new_zeros(len(classes), feats.shape[1]).index_add_(0, pos, feats)
    return classes, sums / counts[:, None].to(feats.dtype)


class Prototypes:
    """A growing table of class prototypes (n_classes, d); scores are cosine similarities. Its state goes into the
    owning method's extra_state."""

    def __init__(self) -> None:
        self.weight: torch.Tensor | None = None

    def set(self, classes: torch.Tensor, means: torch.Tensor, num_classes: int) -> None:
        """Rows `classes` := `means`; the table grows to `num_classes` rows (new rows zero until set)."""
        means = means.float()
        old = self.weight
        w = means.new_zeros(num_classes, means.shape[1])
        if old is not None:
            w[: min(len(old), num_classes)] = old.to(w.device)[:num_classes]
        w[classes.to(w.device)] = means
        self.weight = w

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, n_classes) cosine similarity to each prototype."""
        if self.weight is None:
            raise RuntimeError("Prototypes: no class has a prototype yet")
        w = self.weight.to(features.device)
        return F.normalize(features.float(), dim=1) @ F.normalize(w, dim=1).T

    def state_dict(self) -> dict:
        return {"weight": None if self.weight is None else self.weight.cpu()}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        w = state.get("weight")
        self.weight = None if w is None else w.to(device or "cpu")
