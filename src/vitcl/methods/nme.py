"""Nearest-mean-of-exemplars scoring (iCaRL, Rebuffi et al. 2017; also UCIR's and PODNet's NME rows), shared by
the methods that report it (docs/methods/icarl.md#nearest-mean-of-exemplars).

Interface, for a method that owns an `NMEScorer`:

    self.nme = NMEScorer()
    # after the memory update (consolidate): the means of the classes the memory holds
    self.nme.update(ctx, self.memory.indices(), labels_of_those_rows, self.embed, self.seen, flip=True)
    # evaluation: Method.extra_scorers() names "nme", Method.scores(x) returns self.nme(features) under that name
    self.nme(features)            # (B, d) raw features -> (B, seen) scores, -||f/|f| - mu_c||; argmax is the NME
    extra_state: {"nme": self.nme.state_dict()}, load_extra_state: self.nme.load_state_dict(...)

`class_means(ctx, indices, labels, embed, flip=True)` is the computation alone: per class c,
    mu_c = normalise( 1/|P_c| sum_{p in P_c} (phi(p)/|phi(p)| + phi(flip p)/|phi(flip p)|) / 2 )
with phi = `embed` on test-transformed images and flip the horizontal flip (flip=False drops the second term), as
the iCaRL authors' code computes its class means. Classes without exemplars get no mean and the lowest score.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .base import TaskContext


def flip_averaged_features(embed: Callable[[torch.Tensor], torch.Tensor],
                           flip: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> (phi(x)/|phi(x)| + phi(flip x)/|phi(flip x)|) / 2, or phi(x)/|phi(x)| without flip."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        f = F.normalize(embed(x).float().flatten(1), dim=1)
        if flip:
            f = (f + F.normalize(embed(x.flip(-1)).float().flatten(1), dim=1)) / 2
        return f

    return fn


def class_means(ctx: TaskContext, indices: torch.Tensor, labels: torch.Tensor,
                embed: Callable[[torch.Tensor], torch.Tensor], flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes (K,), means (K, d)): the unit-norm mean of each class in `labels` over its rows `indices` of the
    train set (features from `embed`, averaged with the flipped image when `flip`)."""
    feats = ctx.extract(indices, flip_averaged_features(embed, flip))
    labels = labels.to(feats.device)
    classes = labels.unique(sorted=True)
    sums = feats.new_zeros(len(classes), feats.shape[1]).index_add_(0, torch.searchsorted(classes, labels), feats)
    return classes.cpu(), F.normalize(sums, dim=1)  # the mean's direction: the sum's


class NMEScorer:
    """Class means of exemplars and the nearest-mean scores; its state goes into the owning method's extra_state."""

    def __init__(self) -> None:
        self.means: torch.Tensor | None = None  # (n_classes, d), rows of classes without a mean are NaN

    def update(self, ctx: TaskContext, indices: torch.Tensor, labels: torch.Tensor,
               embed: Callable[[torch.Tensor], torch.Tensor], num_classes: int, flip: bool = True) -> None:
        """Recompute every mean from the rows given (old classes' too: the features have moved)."""
        if len(indices) == 0:
            self.means = None
            return
        classes, mu = class_means(ctx, indices, labels, embed, flip)
        means = torch.full((num_classes, mu.shape[1]), float("nan"), device=mu.device)
        means[classes.to(mu.device)] = mu
        self.means = means

    def __call__(self, features: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
        """(B, num_classes) scores -||features/|features| - mu_c||; -inf for classes without a mean."""
        f = F.normalize(features.float().flatten(1), dim=1)
        n = num_classes if num_classes is not None else (0 if self.means is None else len(self.means))
        out = torch.full((len(f), n), float("-inf"), device=f.device)
        if self.means is None:
            return out
        means = self.means.to(f.device)[:n]
        known = (~means.isnan().any(1)).nonzero().flatten()
        out[:, known] = -torch.cdist(f, means[known], compute_mode="donot_use_mm_for_euclid_dist")
        return out

    def state_dict(self) -> dict:
        return {"means": None if self.means is None else self.means.cpu()}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        means = state.get("means")
        self.means = None if means is None else means.to(device or "cpu")
