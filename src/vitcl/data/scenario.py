"""Scenarios: a class order and a split of it into tasks. Index and slice a scenario by task.

Labels are remapped once: a sample's label is the position of its class in the class order, so task t owns
the contiguous label range [offset_t, offset_t + n_t). Class-IL and task-IL then score the same logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from .dataset import ImageSet


@dataclass(frozen=True)
class Task:
    index: int
    classes: tuple[int, ...]  # class ids of the source, in order
    offset: int  # first label of the task
    train_idx: torch.Tensor  # indices into the scenario's train set
    test_idx: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> range:
        return range(self.offset, self.offset + self.num_classes)

    @property
    def end(self) -> int:
        return self.offset + self.num_classes


class Scenario:
    """Tasks over a train and a test ImageSet whose `labels` are class-order positions."""

    def __init__(self, train: ImageSet, test: ImageSet, class_order: list[int], increments: list[int],
                 setting: str = "class-il", class_names: list[str] | None = None, names: list[str] | None = None):
        self.train, self.test = train, test
        self.class_order = list(class_order)
        self.increments = list(increments)
        self.setting = setting
        self.class_names = class_names or [str(c) for c in class_order]
        self.names = names  # dataset name of each task, for sequences of datasets
        self.data_record: list[dict] = []  # per dataset, what was read (set by the builder; see build._record)
        self.mean: tuple[float, ...] = (0.5,) * max(train.channels, 1)  # normalisation, set by the builder
        self.std: tuple[float, ...] = (0.5,) * max(train.channels, 1)
        n_source = max([max(class_order)] + [int(s.targets.max()) for s in (train, test) if len(s)]) + 1
        label_of = torch.full((n_source,), -1, dtype=torch.long)
        label_of[torch.tensor(class_order)] = torch.arange(len(class_order))
        self.train_labels = label_of[train.targets]
        self.test_labels = label_of[test.targets]
        self.offsets = np.cumsum([0] + increments[:-1]).tolist()
        self.task_of_label = torch.repeat_interleave(torch.arange(len(increments)), torch.tensor(increments))
        self._tasks = [self._make_task(t) for t in range(len(increments))]

    def _make_task(self, t: int) -> Task:
        lo, hi = self.offsets[t], self.offsets[t] + self.increments[t]
        tr = ((self.train_labels >= lo) & (self.train_labels < hi)).nonzero().flatten()
        te = ((self.test_labels >= lo) & (self.test_labels < hi)).nonzero().flatten()
        return Task(t, tuple(self.class_order[lo:hi]), lo, tr, te)

    def __len__(self) -> int:
        return len(self._tasks)

    def __getitem__(self, item):
        return self._tasks[item]

    def __iter__(self):
        return iter(self._tasks)

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    def seen_classes(self, t: int) -> int:
        """Number of classes in tasks 0..t."""
        return self._tasks[t].end

    def describe(self) -> str:
        inc = self.increments
        split = f"B{inc[0]}-{inc[1]}" if len(inc) > 1 and len(set(inc[1:])) == 1 else "+".join(map(str, inc))
        return f"{len(self)} tasks ({split}), {self.num_classes} classes, {self.setting}"


def make_increments(n_classes: int, initial: int, increment: int | list[int]) -> list[int]:
    """[initial, inc, inc, ...] covering n_classes exactly; or an explicit list."""
    if isinstance(increment, list):
        incs = ([initial] if initial else []) + list(increment)
        if sum(incs) != n_classes:
            raise ConfigError(f"data.increment: the tasks hold {sum(incs)} classes but the class order has {n_classes}")
        return incs
    first = initial or increment
    if first > n_classes:
        key = "data.initial_increment" if initial else "data.increment"
        raise ConfigError(f"{key}: {first} classes in the first task, but only {n_classes} exist")
    rest = n_classes - first
    if rest % increment:
        raise ConfigError(f"data.increment: {rest} classes after the first task do not split into tasks of {increment}")
    return [first] + [increment] * (rest // increment)


def check_class_order(order: list[int], n_classes: int) -> None:
    bad = [c for c in order if not 0 <= c < n_classes]
    if bad:
        raise ConfigError(f"data.class_order: classes {bad[:5]} are out of range 0..{n_classes - 1}")
    seen, dup = set(), []
    for c in order:
        if c in seen:
            dup.append(c)
        seen.add(c)
    if dup:
        raise ConfigError(f"data.class_order: classes {dup[:5]} appear more than once")
    missing = sorted(set(range(n_classes)) - seen)
    if missing:
        raise ConfigError(f"data.class_order: covers {len(seen)} of {n_classes} classes; missing {missing[:5]}")
