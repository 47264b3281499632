"""Losses that several methods share, written once so that a method imports them from here and not from another
method's module. Each has a loop-by-loop transcription of its formula in tests/test_losses.py."""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from ..data.transfer import to_device

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


def masked_distillation(student_old: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor, tau: float = 1.0,
                        reduction: Literal["mean", "batchmean"] = "mean") -> torch.Tensor:
    """`distillation` over the rows where `rows` (bool, (B,)) is true, computed on the whole batch with the others
    weighted 0, so that no data-dependent branch (a host read) is needed: equal to
    distillation(student_old[rows], teacher[rows]) when a row is selected, and 0 when none is."""
    log_s = F.log_softmax(student_old.float() / tau, dim=1)
    log_t = F.log_softmax(teacher.float() / tau, dim=1)
    w = rows.float()
    total = ((log_t.exp() * (log_t - log_s)).sum(1) * w).sum()
    count = w.sum() * (log_s.shape[1] if reduction == "mean" else 1)
    return total / count.clamp(min=1) * tau**2


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


def pod_spatial(old_maps: list[torch.Tensor], new_maps: list[torch.Tensor]) -> torch.Tensor:
    """PODNet's POD-spatial distillation (docs/methods/podnet.md#pod-spatial). Per stage: the squared activations
    (B, C, H, W) summed over the width (a C x H vector) and over the height (C x W), the two concatenated and
    L2-normalised per image; the Euclidean distance between teacher and student vectors, averaged over the
    images; then averaged over the stages."""
    if len(old_maps) != len(new_maps) or not new_maps:
        raise ValueError(f"pod_spatial: {len(old_maps)} teacher maps against {len(new_maps)} student maps")
    total = new_maps[0].new_zeros(())
    for a, b in zip(old_maps, new_maps):
        a, b = a.float().pow(2), b.float().pow(2)
        pa = torch.cat([a.sum(3).flatten(1), a.sum(2).flatten(1)], dim=1)
        pb = torch.cat([b.sum(3).flatten(1), b.sum(2).flatten(1)], dim=1)
        total = total + (F.normalize(pa, dim=1) - F.normalize(pb, dim=1)).norm(dim=1).mean()
    return total / len(new_maps)


def pod_flat(old: torch.Tensor, new: torch.Tensor,
             distance: Literal["cosine", "euclidean"] = "cosine") -> torch.Tensor:
    """PODNet's POD-flat on the final embeddings (B, D), averaged over rows: cosine: 1 - cos(old, new) (the
    reference code's cosine-embedding loss); euclidean: ||old - new||_2."""
    if distance == "cosine":
        return (1 - F.cosine_similarity(new.float(), old.float(), dim=1)).mean()
    return (new.float() - old.float()).norm(dim=1).mean()


def local_similarity(features: torch.Tensor, proxies: torch.Tensor, proxies_per_class: int,
                     similarity: Literal["cosine", "neg_squared_distance"] = "cosine") -> torch.Tensor:
    """PODNet's local-similarity classifier (LSC): proxies (C x K, D), K per class, class-major. Per class c, the
    similarities s_ck of the L2-normalised features to the normalised proxies, softmax-weighted over the class's
    proxies: y_c = sum_k softmax_k(s_ck) s_ck. cosine: s = cos (the paper); neg_squared_distance:
    s = -||f^ - w^||^2 = 2 cos - 2 (the reference code's `neg_stable_cosine_distance`)."""
    s = F.normalize(features.float(), dim=1) @ F.normalize(proxies.float(), dim=1).t()
    if similarity == "neg_squared_distance":
        s = (2 - 2 * s).clamp(min=0).neg()
    s = s.view(s.shape[0], -1, proxies_per_class)
    return (s.softmax(dim=2) * s).sum(2)


def nca_margin_loss(similarities: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | float, margin: float,
                    form: Literal["paper", "reference"] = "paper") -> torch.Tensor:
    """PODNet's NCA loss on the class similarities (B, C), averaged over rows.
    paper: [-log(exp(eta (y_t - delta)) / sum_{i != t} exp(eta y_i))]_+ , the margin on the true class only, the
    true class out of the denominator, a hinge at 0.
    reference (the reference code's `nca` with `exclude_pos_denominator`): eta (y - delta) on every class, shifted
    by its row maximum; loss -z_t + log(sum_{i != t} exp(z_i) + 1), the true class's term replaced by exp(0) and
    no hinge. The margin shifts every class alike there, so it cancels (docs/methods/podnet.md#lsc-and-nca)."""
    s = similarities.float()
    rows = torch.arange(s.shape[0], device=s.device)
    true = F.one_hot(y, s.shape[1]).bool()
    if form == "reference":
        z = scale * (s - margin)
        z = z - z.max(dim=1, keepdim=True).values
        den = torch.logsumexp(z.masked_fill(true, 0.0), dim=1)
        return (den - z[rows, y]).mean()
    z = scale * s
    num = scale * (s[rows, y] - margin)
    den = torch.logsumexp(z.masked_fill(true, float("-inf")), dim=1)
    return (den - num).clamp(min=0).mean()


def soft_distillation(student_old: torch.Tensor, teacher: torch.Tensor, T: float = 2.0) -> torch.Tensor:
    """Hinton's softened cross-entropy: the mean over rows of -sum_c softmax(teacher/T)_c log softmax(student/T)_c,
    with no T² factor (LwF's, iCaRL's softmax option's, BiC's and WA's L_KD, as their papers, FACIL and PyCIL write
    it; the KL of `distillation` plus the teacher's entropy, so the same gradient up to T²)."""
    log_s = F.log_softmax(student_old.float() / T, dim=1)
    p_t = F.softmax(teacher.float() / T, dim=1)
    return -(p_t * log_s).sum(1).mean()


def icarl_bce(logits: torch.Tensor, y: torch.Tensor, teacher_old: torch.Tensor | None) -> torch.Tensor:
    """iCaRL's classification + distillation loss (Rebuffi et al. 2017, Algorithm 3): sigmoid binary
    cross-entropy on every output, the targets one-hot labels for the new classes and the previous model's
    sigmoid outputs for the old ones (the n_old = teacher_old.shape[1] first columns), averaged over B x C."""
    targets = F.one_hot(y, logits.shape[1]).to(torch.float32)
    if teacher_old is not None and teacher_old.shape[1]:
        targets[:, : teacher_old.shape[1]] = torch.sigmoid(teacher_old.float())
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


def ewc_penalty(params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """EWC's quadratic penalty without its weight (Kirkpatrick et al. 2017, eq. 3): 1/2 sum_i F_i (theta_i -
    theta*_i)^2 over the parameters named in `fisher`; the caller multiplies by lambda."""
    total = torch.zeros((), device=next(iter(params.values())).device)
    for name, f in fisher.items():
        total = total + (f * (params[name].float() - anchor[name]) ** 2).sum()
    return total / 2


def task_cross_entropy(logits: torch.Tensor, batch: Batch, offset: int,
                       scope: Literal["task", "all"] = "task") -> torch.Tensor:
    """Cross-entropy over the current task's classes [offset, C) only, labels shifted by offset (scope 'task':
    LwF's and EWC's loss without memory in FACIL and PyCIL), or over every seen class (scope 'all')."""
    if scope == "all" or offset == 0:
        return classification_loss(logits, batch)
    y, soft = task_targets(batch.y, batch.soft, offset, logits.shape[1])
    if soft is not None:
        return soft_cross_entropy(logits[:, offset:], soft)
    # checked on the device, without a host read (on a GPU it fails at a later kernel)
    torch._assert_async((y >= 0).all(), "task_cross_entropy: a row of an old class has no target among the current "
                                        "task's classes")
    return F.cross_entropy(logits[:, offset:], y)


def grouped_distillation(student: torch.Tensor, teacher: torch.Tensor, bounds: list[int],
                         T: float = 2.0) -> torch.Tensor:
    """E2E's cross-distillation: `soft_distillation` within each group of columns [bounds[g], bounds[g + 1]) (one
    per task's head), summed over the groups; the softmax of each group is its own."""
    total = student.new_zeros((), dtype=torch.float32)
    for a, b in zip(bounds[:-1], bounds[1:]):
        total = total + soft_distillation(student[:, a:b], teacher[:, a:b], T)
    return total


def less_forget(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """UCIR's less-forget constraint: the mean over rows of 1 - cos(f_new(x), f_old(x)) (docs/methods/ucir.md)."""
    return (1 - F.cosine_similarity(features.float(), old_features.float(), dim=1, eps=1e-8)).mean()


def hard_negative_margin_ranking(cosines: torch.Tensor, y: torch.Tensor, n_old: int, k: int,
                                 margin: float) -> torch.Tensor:
    """UCIR's inter-class separation: for each row of an old class (y < n_old), its own class's cosine against
    the k highest cosines among the new classes (columns n_old:), mean over those rows and k of
    max(0, margin - cos_own + cos_hard); zero when the batch has no old-class row."""
    rows = (y < n_old).float()  # a mask, not a selection: no host read of how many rows there are
    c = cosines.float()
    own = c.gather(1, y[:, None].clamp(max=c.shape[1] - 1))
    hard = c[:, n_old:].topk(min(k, c.shape[1] - n_old), dim=1).values
    terms = (margin - own + hard).clamp(min=0) * rows[:, None]
    return terms.sum() / (rows.sum() * hard.shape[1]).clamp(min=1.0)


def stored_logits_mse(logits: torch.Tensor, stored: torch.Tensor, n_stored: torch.Tensor) -> torch.Tensor:
    """Dark experience replay's term: the squared distance between the current logits of memory samples and the
    logits stored with them, averaged over the entries stored: row i holds its first n_stored[i] columns (the
    classes seen when it was stored; a growing head's later columns have no stored value)."""
    k = min(logits.shape[1], stored.shape[1])
    cols = torch.arange(k, device=logits.device)
    mask = (cols[None, :] < to_device(n_stored, logits.device)[:, None]).float()
    sq = (logits[:, :k].float() - to_device(stored[:, :k], logits.device).float()) ** 2
    return (sq * mask).sum() / mask.sum().clamp(min=1.0)
