"""HAL: hindsight anchor learning (Chaudhry, Gordo, Dokania, Torr & Lopez-Paz, AAAI 2021; as Mammoth's models/hal.py,
aimagelab/mammoth @ 0d727a7235cf; docs/methods/hal.md).

ER (methods/er.py: reservoir memory, the task's batch and a memory batch in one cross-entropy) plus one anchor per
class. At each step, with g the gradient of the ER loss at theta, a temporary SGD step theta~ = theta - lr * g gives
the anchors' reference outputs f_theta~(E), and the step the optimiser takes follows
    grad [ ER loss + lambda * mean (f_theta(E) - f_theta~(E))^2 ]
(Mammoth takes the temporary step with its optimiser, then steps again from theta with both gradients summed).
At each task end, theta_M is theta fine-tuned for a few SGD steps on memory batches, and each class c of the task
gets the anchor e that ascends, from uniform noise, the forgetting proxy
    J(e) = CE(f_theta_M(e), c) - CE(f_theta(e), c) - gamma * ||h_theta(e) - phi_c||^2
with h the backbone's features and phi_c a running mean (decay beta) of the features of c's training images.
Anchors, their labels and the running means are part of the checkpoint.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..data import distributed
from ..data.transfer import to_device
from ..errors import ConfigError
from .base import register_method, require_constant_lr
from .er import StreamReplay, StreamReplayOptions
from .finetune import Classifier


@dataclass
class HALOptions(StreamReplayOptions):
    # Mammoth's best arguments for seq-cifar10 at memory 200 (hal_lambda, beta, gamma, steps_on_anchors,
    # finetuning_epochs); Mammoth's anchors and its fine-tuning step run at the training lr
    anchor_lambda: float = 0.2  # weight of the anchor loss
    beta: float = 0.5  # decay of the running mean of features
    gamma: float = 0.1  # weight of the feature distance in the anchor objective
    anchor_steps: int = 100  # gradient-ascent steps of each task's anchors
    anchor_lr: float = 0.0  # step size of the ascent; 0: train.lr
    finetune_steps: int = 1  # SGD steps of theta_M, one memory batch (train.batch_size rows) each
    # class: phi_c per class (the paper's class mean); task: one mean of all the task's images (Mammoth's phi)
    feature_mean: Literal["class", "task"] = "class"
    # the anchors' forward passes in a training step (train mode): keep: batch norms normalise the anchors with
    # their batch's statistics and leave the running statistics alone; update: they also fold the anchors'
    # statistics into the running ones, twice per step, as Mammoth's net(anchors) calls do (the CIFAR presets).
    # On a BN ResNet the synthetic anchors' statistics then drive evaluation (docs/methods/hal.md#batch-norm)
    anchor_norm_stats: Literal["keep", "update"] = "keep"

    def validate(self, key: str) -> None:
        super().validate(key)
        for name in ("anchor_lambda", "gamma", "anchor_lr", "anchor_steps", "finetune_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: expected a value >= 0, got {getattr(self, name)}")
        if not 0 <= self.beta < 1:
            raise ConfigError(f"{key}.beta: expected a decay in [0, 1), got {self.beta}")


def anchor_loss(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean over anchors and outputs of the squared difference (Mammoth's reduction); the paper's weight is outside."""
    return ((current.float() - reference.float()) ** 2).mean()


def anchor_objective(tuned_logits: torch.Tensor, logits: torch.Tensor, feats: torch.Tensor, means: torch.Tensor,
                     labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """J per anchor: the forgetting proxy CE(theta_M) - CE(theta) minus gamma times the squared distance of the
    anchor's features to its mean. Anchors ascend it."""
    forgetting = (F.cross_entropy(tuned_logits, labels, reduction="none")
                  - F.cross_entropy(logits, labels, reduction="none"))
    return forgetting - gamma * ((feats - means) ** 2).sum(1)


@contextmanager
def kept_norm_statistics(model, keep: bool):
    """Batch norms normalise with the batch's statistics but leave their running statistics as they are."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] if keep else []
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom


@register_method("hal")
class HAL(StreamReplay):
    Options: ClassVar[type] = HALOptions
    opts: HALOptions

    def __init__(self, cfg, scenario, device):
        super().__init__(cfg, scenario, device)
        shape = (scenario.train.channels, scenario.train.image_size, scenario.train.image_size)
        self.anchors = torch.zeros((0, *shape), device=device)
        self.anchor_labels = torch.zeros(0, dtype=torch.long, device=device)
        groups = scenario.num_classes if self.opts.feature_mean == "class" else 1
        self.means = torch.zeros(groups, self.model.backbone.num_features, device=device)
        self._feats: list[tuple[torch.Tensor, torch.Tensor]] = []

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        require_constant_lr(cfg, "temporary step")

    def begin_task(self, task):
        super().begin_task(task)
        self.means.zero_()  # Mammoth rebuilds phi from zeros for every task
        self._feats = []

    def loss(self, batch, phase, task):
        x, y = batch.x, batch.y
        if batch.memory is not None:
            x, y = torch.cat([x, batch.memory.x]), torch.cat([y, batch.memory.y])
        feats = self.model.backbone(x)
        self._feats.append((feats[: len(batch.x)].detach(), batch.y))  # the task's rows, for the running mean
        return F.cross_entropy(self.model.head(feats), y), {}

    def before_step(self, batches, phase, task):
        if not len(self.anchors):
            return
        temporary = {n: p.detach() - phase.lr * p.grad if p.grad is not None else p.detach()
                     for n, p in self.model.named_parameters()}
        with torch.no_grad(), kept_norm_statistics(self.model, self.opts.anchor_norm_stats == "keep"):
            reference = functional_call(self.model, temporary, (self.anchors,))
        # the same anchors and gradients on every rank: the added gradient needs no reduction
        with kept_norm_statistics(self.model, self.opts.anchor_norm_stats == "keep"):
            current = self.model(self.anchors)
        (self.opts.anchor_lambda * anchor_loss(current, reference)).backward()

    def after_step(self, batches, phase, task, step):
        kept, self._feats = self._feats, []
        if kept:
            self.update_means(torch.cat([f for f, _ in kept]).float(), torch.cat([y for _, y in kept]))
        super().after_step(batches, phase, task, step)

    def update_means(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """phi <- beta * phi + (1 - beta) * the step's mean feature, per class present in the step's global batch."""
        groups = to_device(labels, feats.device) if self.opts.feature_mean == "class" else torch.zeros_like(labels,
                                                                                                     device=feats.device)
        sums = torch.zeros_like(self.means).index_add_(0, groups, feats)
        counts = torch.zeros(len(self.means), device=feats.device).index_add_(0, groups, torch.ones_like(feats[:, 0]))
        distributed.all_reduce_sum(sums)
        distributed.all_reduce_sum(counts)
        decayed = self.opts.beta * self.means + (1 - self.opts.beta) * sums / counts.clamp(min=1)[:, None]
        self.means = torch.where(counts[:, None] > 0, decayed, self.means)  # no host read: no sync per step

    # ------------------------------------------------------------------ anchors at the task's end
    def consolidate(self, task, ctx):
        if not len(self.memory):
            return
        lr = self.phases(task)[0].lr  # the training lr (Mammoth's args.lr), as the phase scales it
        labels = torch.arange(task.offset, task.end, device=self.device)
        # drawn before any augmentation: each rank augments its own share of the rows, and so leaves the global
        # generator in its own state, while the noise and the rows must be every rank's
        start = torch.rand((len(labels), *self.anchors.shape[1:])).to(self.device)  # Mammoth: uniform [0, 1)
        draws = [torch.randperm(len(self.memory))[: self.cfg.train.batch_size] for _ in range(self.opts.finetune_steps)]
        tuned = self.finetuned(ctx, lr, draws)
        means = self.means[labels] if self.opts.feature_mean == "class" else self.means[[0] * len(labels)]
        anchors = self.ascend(start, labels, tuned, means, self.opts.anchor_lr or lr)
        self.anchors = torch.cat([self.anchors, anchors])
        self.anchor_labels = torch.cat([self.anchor_labels, labels])

    def finetuned(self, ctx, lr: float, draws: list[torch.Tensor]) -> torch.nn.Module:
        """theta_M: a copy of the model after one SGD step (train mode) per draw of memory positions, on augmented
        memory batches, returned in eval mode with its BatchNorm statistics averaged over ranks."""
        tuned = copy.deepcopy(self.model).train()
        params = [p for p in tuned.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr)
        for positions in draws:
            rows = self.memory.indices()[positions]
            opt.zero_grad(set_to_none=False)
            for p in params:
                p.grad = torch.zeros_like(p)  # every rank reduces every gradient, even one that holds no rows
            for x, idx in ctx.batches(rows, augment=True, batch_size=len(rows)):
                y = self.scenario.train_labels[idx.cpu()].to(self.device)
                (F.cross_entropy(tuned(x), y, reduction="sum") / len(rows)).backward()
            for p in params:
                ctx.reduce_sum(p.grad)
            opt.step()
        distributed.average_buffers(tuned)  # each rank normalised its own share of the rows
        return tuned.eval()

    def ascend(self, start: torch.Tensor, labels: torch.Tensor, tuned: torch.nn.Module,
               means: torch.Tensor, lr: float) -> torch.Tensor:
        """Plain gradient ascent on sum_e J(e) (J is separable over anchors in eval mode: one SGD per anchor)."""
        model = cast(Classifier, self.model)
        training = model.training
        model.eval()
        e = start.clone()
        try:
            for _ in range(self.opts.anchor_steps):
                e.requires_grad_(True)
                feats = model.backbone(e)
                j = anchor_objective(tuned(e), model.head(feats), feats, means, labels, self.opts.gamma)
                (grad,) = torch.autograd.grad(j.sum(), [e])
                e = (e + lr * grad).detach()
        finally:
            model.train(training)
        return e.detach()

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        return {"anchors": self.anchors.cpu(), "anchor_labels": self.anchor_labels.cpu(), "means": self.means.cpu()}

    def load_extra_state(self, state: dict) -> None:
        self.anchors = state["anchors"].to(self.device)
        self.anchor_labels = state["anchor_labels"].to(self.device)
        self.means = state["means"].to(self.device)
