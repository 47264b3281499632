"""Joint training: the upper bound. At each task, train on the full data of every seen task.

With a single task of all classes (initial_increment = number of classes) this is plain offline training.
"""
from __future__ import annotations

from .base import Phase, register_method
from .finetune import Finetune


@register_method("joint")
class Joint(Finetune):
    def phases(self, task):
        return [Phase.from_train("train", "seen", self.cfg.train, task.index)]
