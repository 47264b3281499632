"""GSS: ER whose memory keeps the streamed samples whose gradients differ most from the memory's (Aljundi, Lin,
Goujaud and Bengio, "Gradient based sample selection for online continual learning", NeurIPS 2019; GSS-Greedy as
Mammoth's models/gss.py and utils/gss_buffer.py, commit 2cc8a47e5b84694cfa3278098a56666e5d710683).

Training is ER's (methods/er.py): the task's batch and a memory batch, one cross-entropy. After the optimiser step
the batch streams into the memory with the GSS policy (data/stream_memory.py `GradientSampleSelection`): a sample's
score is max_k cos(g, g_k) + 1, g its loss gradient over all trainable parameters and g_k those of a random subset
of the memory; the batch's score is the same for the gradient of the batch's mean loss. Gradients are taken with the
network in eval mode (batch norm on its running statistics), as Mammoth's `get_grads`. The subset the scores compare
with is the step's memory batch (`method.memory_batch` slots, Mammoth's gss_minibatch_size = minibatch_size in its
best settings) with its training augmentation, where Mammoth draws a second subset of non-augmented images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import distributed
from ..data.stream_memory import GradientSampleSelection
from ..errors import ConfigError
from .base import register_method
from .er import ExperienceReplay


@register_method("gss")
class GSS(ExperienceReplay):
    chunk = 5  # per-sample gradients at a time when scoring (Mammoth's grads_at_a_time)

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.memory.selection != "gss":
            raise ConfigError(f"memory.selection: gss selects by gradients; expected 'gss', got "
                              f"'{cfg.memory.selection}'")

    def flat_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        loss = F.cross_entropy(self.train_logits(x), y)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    def score(self, g: torch.Tensor, memory_grads: torch.Tensor) -> float:
        return float(F.cosine_similarity(g[None], memory_grads, dim=1).max()) + 1.0

    def after_step(self, batches, phase, task, step):
        if distributed.world_size() > 1:
            raise ConfigError("memory.selection: gss scores samples with this process's gradients; run it on one "
                              "process")
        policy = self.memory.policy
        assert isinstance(policy, GradientSampleSelection)
        training = self.model.training
        self.model.eval()
        try:
            for b in batches:
                self._score_batch(policy, b)
                rows = b.index.cpu()
                labels = self.scenario.train_labels[rows]
                self.memory.observe(rows, labels, self.scenario.task_of_label[labels], b.position, None)
        finally:
            self.model.train(training)
            self._kept = []

    def _score_batch(self, policy: GradientSampleSelection, b) -> None:
        if b.memory is None:
            policy.batch_score, policy.sample_score = 0.1, lambda sample: 0.0
            return
        with torch.enable_grad():
            memory_grads = torch.stack([self.flat_grad(b.memory.x[i: i + 1], b.memory.y[i: i + 1])
                                        for i in range(len(b.memory.x))])
            policy.batch_score = self.score(self.flat_grad(b.x, b.y), memory_grads)

        def sample_score(sample: int) -> float:
            with torch.enable_grad():
                return self.score(self.flat_grad(b.x[sample: sample + 1], b.y[sample: sample + 1]), memory_grads)

        policy.sample_score = sample_score
