"""Continual-learning metrics from accuracy matrices. acc[i][j]: accuracy on task j after training task i
(NaN where j > i). `seen[i]`: accuracy on the test data of all tasks 0..i after task i."""
from __future__ import annotations

import math


def average_incremental(seen: list[float]) -> float:
    """Mean over steps of the accuracy on all seen classes, first step included (DyTox's "Avg")."""
    return sum(seen) / len(seen) if seen else math.nan


def forgetting(acc: list[list[float]]) -> float:
    """Chaudhry et al.: mean over old tasks j of (best accuracy on j before the last step) - (final accuracy)."""
    T = len(acc)
    if T < 2:
        return 0.0
    drops = [max(acc[i][j] for i in range(j, T - 1)) - acc[T - 1][j] for j in range(T - 1)]
    return sum(drops) / len(drops)


def backward_transfer(acc: list[list[float]]) -> float:
    """Lopez-Paz & Ranzato: mean over old tasks j of (final accuracy on j) - (accuracy on j right after j)."""
    T = len(acc)
    if T < 2:
        return 0.0
    return sum(acc[T - 1][j] - acc[j][j] for j in range(T - 1)) / (T - 1)


def summarize(acc: list[list[float]], seen: list[float]) -> dict:
    return {
        "avg_incremental": average_incremental(seen),
        "last": seen[-1] if seen else math.nan,
        "forgetting": forgetting(acc),
        "bwt": backward_transfer(acc),
    }
