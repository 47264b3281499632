"""Losses that several methods share, written once so that a method imports them from here and not from another
method's module. Each has a loop-by-loop transcription of its formula in tests/test_losses.py."""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .base import Batch


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on soft targets (MixUp/CutMix, label smoothing): the mean over rows of
    -sum_c targets[i, c] * log_softmax(logits)[i, c]."""
    return torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()


def classification_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Softmax cross-entropy over the seen classes, on soft targets when the batch was mixed."""
    if batch.soft is not None:
        return soft_cross_entropy(logits, batch.soft)
    return F.cross_entropy(logits, batch.y)


def task_targets(y: torch.Tensor, soft: torch.Tensor | None, offset: int,
                 end: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels and soft targets for a head over the classes [offset, end) only: labels shifted by offset, soft
    targets cut to those columns and renormalised (mixed-in mass of other tasks' classes is dropped)."""
    if soft is not None:
        soft = soft[:, offset:end]
        soft = soft / soft.sum(1, keepdim=True).clamp(min=1e-12)
    return y - offset, soft


def distillation(student_old: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0,
                 reduction: Literal["mean", "batchmean"] = "mean") -> torch.Tensor:
    """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)) over the old classes; `mean` divides the sum
    by B x n_old (the published `F.kl_div(..., reduction='mean', log_target=True)`, an element-wise mean),
    `batchmean` by B. Written out because torch announces that its 'mean' will become 'batchmean'."""
    log_s = F.log_softmax(student_old.float() / tau, dim=1)
    log_t = F.log_softmax(teacher.float() / tau, dim=1)
    total = (log_t.exp() * (log_t - log_s)).sum()
    return total / (log_s.numel() if reduction == "mean" else log_s.shape[0]) * tau**2


def stored_distillation(logits: torch.Tensor, stored: torch.Tensor, width: torch.Tensor, T: float) -> torch.Tensor:
    """T²·KL(softmax(z/T) ‖ softmax(logits/T)) per row over its first width[i] classes, averaged over rows: the
    distillation towards logits stored with memory rows when fewer classes had been seen (z padded to any width)."""
    cols = torch.arange(logits.shape[1], device=logits.device)
    valid = cols[None, :] < width[:, None]
    n = min(logits.shape[1], stored.shape[1])
    a = logits[:, :n].float().masked_fill(~valid[:, :n], -1e9) / T  # finite fill: no NaN in the gradient
    z = stored[:, :n].float().masked_fill(~valid[:, :n], -1e9) / T
    log_p, log_q = F.log_softmax(z, dim=1), F.log_softmax(a, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).masked_fill(~valid[:, :n], 0.0).sum(1)
    return kl.mean() * T * T


def less_forget(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """UCIR's less-forget constraint: the mean over rows of 1 - cos(f_new(x), f_old(x)) (docs/methods/ucir.md)."""
    return (1 - F.cosine_similarity(features.float(), old_features.float(), dim=1, eps=1e-8)).mean()


def hard_negative_margin_ranking(cosines: torch.Tensor, y: torch.Tensor, n_old: int, k: int,
                                 margin: float) -> torch.Tensor:
    """UCIR's inter-class separation: for each row of an old class (y < n_old), its own class's cosine against
    the k highest cosines among the new classes (columns n_old:), mean over those rows and k of
    max(0, margin - cos_own + cos_hard); zero when the batch has no old-class row."""
    rows = y < n_old
    if not bool(rows.any()):
        return cosines.sum() * 0.0
    c = cosines[rows].float()
    own = c.gather(1, y[rows][:, None])
    hard = c[:, n_old:].topk(min(k, c.shape[1] - n_old), dim=1).values
    return (margin - own + hard).clamp(min=0).mean()
