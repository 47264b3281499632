"""FDR (Benjamin et al., ICLR 2019): function distance regularisation (docs/methods/fdr.md).

At each task end the memory keeps, with every exemplar, the model's logits over the classes seen then. Each step
trains on the task's batch with the engine's optimiser; then, as Mammoth's models/fdr.py does, one more SGD step
on a memory batch (augmented, drawn every step) minimises the function distance
    mean over rows of || softmax(f(x)) - softmax(stored logits) ||_2
with the current logits restricted to the classes the stored ones cover. That step has its own optimiser
(SGD at the phase's lr, momentum and weight decay), checkpointed with the method.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..data import distributed
from ..errors import ConfigError
from .base import MethodOptions, register_method, require_constant_lr
from .gem import EpisodicMemory


@dataclass
class FDROptions(MethodOptions):
    memory_batch: int = 0  # rows of the memory batch of the extra step; 0: train.batch_size

    def validate(self, key: str) -> None:
        if self.memory_batch < 0:
            raise ConfigError(f"{key}.memory_batch: expected 0 (train.batch_size) or more, got {self.memory_batch}")


def function_distance(logits: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Mean L2 distance between the softmax outputs, over the columns where `stored` is finite (the classes seen
    when it was stored; later ones are -inf)."""
    stored = stored.float()[:, : logits.shape[1]]  # padded to all classes; the finite ones were seen already
    current = logits.float().masked_fill(~torch.isfinite(stored), float("-inf"))
    return (current.softmax(1) - stored.softmax(1)).norm(dim=1).mean()


@register_method("fdr")
class FDR(EpisodicMemory):
    Options = FDROptions
    opts: FDROptions

    def __init__(self, cfg, scenario, device):
        super().__init__(cfg, scenario, device)
        self.num_classes = sum(t.num_classes for t in scenario)
        self.optimizer: torch.optim.SGD | None = None
        self.where: tuple[int, str] = (-1, "")  # the (task, phase) the optimiser belongs to
        self.pending: dict | None = None  # a checkpointed {"where", "state"}, loaded if it is that phase's

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        require_constant_lr(cfg, "memory step")

    def phases(self, task):
        size = self.opts.memory_batch or self.cfg.train.batch_size
        return [replace(p, data="task", memory_batch=size) for p in super().phases(task)]

    def setup_phase(self, phase, task):
        super().setup_phase(phase, task)
        o = phase.optim
        self.optimizer = torch.optim.SGD(self.trainable(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        self.where = (task.index, phase.name)
        if self.pending is not None and tuple(self.pending["where"]) == self.where:
            self.optimizer.load_state_dict(self.pending["state"])
        self.pending = None

    def candidate_outputs(self, task, ctx, labels, scores):
        feats, _ = super().candidate_outputs(task, ctx, labels, scores)
        logits = ctx.extract(task.train_idx, self.logits).float()
        padded = torch.full((len(logits), self.num_classes), float("-inf"))
        padded[:, : logits.shape[1]] = logits.cpu()
        return feats, {"logits": padded}

    def after_step(self, batches, phase, task, step):
        memory = [b.memory for b in batches if b.memory is not None]
        if not memory or self.optimizer is None:
            return
        self.optimizer.zero_grad(set_to_none=True)
        rows = sum(len(m.y) for m in memory)
        total = torch.full((), float(rows), device=self.device)  # a fill: no copy from the host
        distributed.all_reduce_sum(total)
        for m in memory:  # the mean over the whole memory batch, summed over micro-batches and ranks
            stored = self.memory.lookup("logits", m.index, self.device)
            (function_distance(self.logits(m.x), stored) * (len(m.y) / total)).backward()
        for p in self.trainable():
            if p.grad is not None:
                distributed.all_reduce_sum(p.grad)
        self.optimizer.step()

    def extra_state(self) -> dict:
        if self.optimizer is None:
            return {}
        return {"optimizer": {"where": list(self.where), "state": self.optimizer.state_dict()}}

    def load_extra_state(self, state: dict) -> None:
        self.pending = state.get("optimizer")  # taken by setup_phase, which a resumed run calls next
