"""The shared losses (methods/losses.py) against slow transcriptions of their formulas: plain loops over rows and
classes in float64, compared numerically."""
import math

import pytest
import torch

from vitcl.methods import Batch
from vitcl.methods.losses import (
    classification_loss,
    distillation,
    soft_cross_entropy,
    stored_distillation,
    task_targets,
)


def _log_softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    log_z = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - log_z for v in row]


def _soft_ce_loop(logits: torch.Tensor, targets: torch.Tensor) -> float:
    total = 0.0
    for z, p in zip(logits.tolist(), targets.tolist()):
        log_q = _log_softmax_row(z)
        total += -sum(p[c] * log_q[c] for c in range(len(z)))
    return total / len(logits)


def _kl_loop(teacher: list[float], student: list[float], tau: float) -> float:
    """sum_c p_c (log p_c - log q_c), p = softmax(teacher / tau), q = softmax(student / tau)."""
    log_p = _log_softmax_row([v / tau for v in teacher])
    log_q = _log_softmax_row([v / tau for v in student])
    return sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))


def test_soft_cross_entropy_matches_its_formula():
    torch.manual_seed(0)
    logits, targets = torch.randn(7, 5), torch.softmax(torch.randn(7, 5), 1)
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(_soft_ce_loop(logits, targets), rel=1e-6)


def test_classification_loss_hard_and_soft():
    torch.manual_seed(1)
    logits, y = torch.randn(6, 4), torch.tensor([0, 3, 1, 1, 2, 0])
    b = Batch(x=torch.zeros(6), y=y, task=torch.zeros(6), index=torch.arange(6))
    hard = sum(-_log_softmax_row(z)[c] for z, c in zip(logits.tolist(), y.tolist())) / 6
    assert classification_loss(logits, b).item() == pytest.approx(hard, rel=1e-6)
    b.soft = torch.softmax(torch.randn(6, 4), 1)
    assert classification_loss(logits, b).item() == pytest.approx(_soft_ce_loop(logits, b.soft), rel=1e-6)


def test_task_targets_shift_labels_and_renormalise_the_slice():
    torch.manual_seed(2)
    y, soft = torch.tensor([2, 3, 4, 3]), torch.softmax(torch.randn(4, 6), 1)
    local, cut = task_targets(y, soft, 2, 5)
    assert local.tolist() == [0, 1, 2, 1]
    for i in range(4):
        mass = sum(soft[i, c].item() for c in range(2, 5))
        for j, c in enumerate(range(2, 5)):
            assert cut[i, j].item() == pytest.approx(soft[i, c].item() / mass, rel=1e-6)
    local, none = task_targets(y, None, 2, 5)
    assert none is None and local.tolist() == [0, 1, 2, 1]


def test_distillation_matches_its_formula():
    torch.manual_seed(3)
    s, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    for tau in (1.0, 2.0):
        kl = sum(_kl_loop(tr, sr, tau) for tr, sr in zip(t.tolist(), s.tolist()))
        assert distillation(s, t, tau, "mean").item() == pytest.approx(kl / 15 * tau**2, rel=1e-6)
        assert distillation(s, t, tau, "batchmean").item() == pytest.approx(kl / 5 * tau**2, rel=1e-6)


def test_stored_distillation_matches_its_formula():
    torch.manual_seed(4)
    logits, stored = torch.randn(4, 7), torch.randn(4, 9)  # stored logits padded wider than the student's
    width = torch.tensor([2, 5, 7, 3])
    T = 2.0
    want = sum(_kl_loop(stored[i, :w].tolist(), logits[i, :w].tolist(), T) * T * T
               for i, w in enumerate(width.tolist())) / 4
    assert stored_distillation(logits, stored, width, T).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_masked_distillation_is_the_distillation_of_the_selected_rows(reduction):
    from vitcl.methods.losses import distillation, masked_distillation

    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    rows = torch.tensor([True, False, True, True, False, False])
    got = masked_distillation(s, t, rows, 2.0, reduction)
    assert got.item() == pytest.approx(distillation(s[rows], t[rows], 2.0, reduction).item(), rel=1e-6)
    assert masked_distillation(s, t, torch.zeros(6, dtype=torch.bool), 2.0, reduction).item() == 0.0
