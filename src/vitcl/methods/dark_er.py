"""DER and DER++: dark experience replay (Buzzega et al., NeurIPS 2020; the Mammoth code, aimagelab/mammoth).

The memory streams by reservoir sampling (as ER, methods/er.py) and stores with each row the logits the network gave
its augmented image when it streamed. A step's loss, x the task's batch and (x', z') a memory batch with its stored
logits:
    DER:   CE(f(x), y) + alpha * ||f(x') - z'||^2
    DER++: DER + beta * CE(f(x''), y''), (x'', y'') a second, independent memory batch.
Each forward pass is its own (batch norm sees each batch separately), as Mammoth's der.py and derpp.py. The
head is Mammoth's by default (`method.head: all-classes`: one linear over all the scenario's classes, every stored
row holding logits over all of them, the not-yet-seen columns included, which keeps them low); with `head:
growing` a row stored during task t holds logits over the classes seen then and only those are compared
(docs/methods/er.md).
Defaults: the DER paper's best values for Seq-CIFAR-10 at memory 200 (DER alpha 0.3; DER++ alpha 0.1, beta 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import register_method
from .er import StreamReplay, StreamReplayOptions
from .losses import stored_logits_mse


@dataclass
class DarkERPPOptions(StreamReplayOptions):
    alpha: float = 0.1  # weight of the stored-logit distance
    beta: float = 0.5  # weight of the second memory batch's cross-entropy

    def validate(self, key: str) -> None:
        super().validate(key)
        for name in ("alpha", "beta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: expected a value >= 0, got {getattr(self, name)}")


@dataclass
class DarkEROptions(StreamReplayOptions):
    alpha: float = 0.3

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.alpha < 0:
            raise ConfigError(f"{key}.alpha: expected a value >= 0, got {self.alpha}")


@register_method("dark-er")
class DarkER(StreamReplay):
    Options: ClassVar[type] = DarkEROptions
    opts: DarkEROptions

    def stream_extras(self, batch, logits):
        return {"logits": logits, "classes": torch.full((len(logits),), logits.shape[1], device=logits.device)}

    def distance(self, mem) -> torch.Tensor:
        stored = self.memory.extra_at("logits", mem.slot, mem.x.device)
        classes = self.memory.extra_at("classes", mem.slot, mem.x.device)
        return stored_logits_mse(self.train_logits(mem.x), stored, classes)

    def loss(self, batch, phase, task):
        logits = self.train_logits(batch.x)
        self.keep(batch, logits)
        ce = F.cross_entropy(logits, batch.y)
        if batch.memory is None:
            return ce, {"ce": ce.detach()}
        mse = self.distance(batch.memory)
        return ce + self.opts.alpha * mse, {"ce": ce.detach(), "mse": mse.detach()}


@register_method("dark-er-pp")
class DarkERPP(DarkER):
    Options: ClassVar[type] = DarkERPPOptions
    opts: DarkERPPOptions  # type: ignore[assignment]
    memory_draws = 2

    def loss(self, batch, phase, task):
        loss, logs = super().loss(batch, phase, task)
        if not batch.memory_more:
            return loss, logs
        second = batch.memory_more[0]
        ce_mem = F.cross_entropy(self.train_logits(second.x), second.y)
        return loss + self.opts.beta * ce_mem, {**logs, "ce_memory": ce_mem.detach()}
