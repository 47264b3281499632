"""Named class orders used by the papers, and seeded permutations."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def seeded_permutation(n_classes: int, seed: int) -> list[int]:
    """numpy's legacy permutation, as in `np.random.seed(seed); np.random.permutation(n)`."""
    return np.random.RandomState(seed).permutation(n_classes).tolist()


# name -> (number of classes, order). ImageNet-100's order 1 is numpy's seed-1993 permutation (methods.md 1.8).
NAMED_ORDERS: dict[str, tuple[int, list[int]]] = {
    "imagenet100-order1": (100, seeded_permutation(100, 1993)),
}


def resolve_class_order(spec, n_classes: int, seed: int) -> list[int]:
    if spec is None:
        return list(range(n_classes))
    if isinstance(spec, list):
        return list(spec)
    if spec == "random":
        return seeded_permutation(n_classes, seed)
    if spec in NAMED_ORDERS:
        n, order = NAMED_ORDERS[spec]
        if n != n_classes:
            raise ConfigError(f"data.class_order: '{spec}' orders {n} classes but the dataset has {n_classes}")
        return list(order)
    names = ", ".join(["random", *sorted(NAMED_ORDERS)])
    raise ConfigError(f"data.class_order: unknown order '{spec}'; expected a list of classes or one of: {names}")
