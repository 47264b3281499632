"""SLCA, Slow Learner with Classifier Alignment (Zhang et al., ICCV 2023): the whole pretrained ViT fine-tuned at
a small multiple of the classifier's lr, then the classifier re-aligned on features sampled from per-class
Gaussians (docs/methods/slca.md).

Task t: cross-entropy over the task's own head only (labels shifted to it, old heads frozen), the backbone at
`backbone_lr_scale` (1/100) of the phase's lr. After it: the mean and covariance (+ cov_eps I) of each new class's
features (test transform) are stored; for t >= 1 the heads of all tasks are trained for `ca_epochs` on
`ca_samples` features per seen class drawn from N(s_c mu_c, Sigma_c), s_c = 0.9 + 0.1 (task(c) + 1) / (t + 1)
(the reference's), with the logits divided by the mean over tasks of each task block's L2 norm and by
`logit_norm` (tau) before the cross-entropy. Evaluation uses the aligned heads; the next task starts from the heads
as they were before the alignment (the reference's backup / recall).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import GrowingHead, create_backbone
from ..models.heads import TaskHead
from ..models.layers import trunc_normal_
from .base import Method, MethodOptions, register_method
from .finetune import Classifier
from .losses import task_cross_entropy


@dataclass
class SLCAOptions(MethodOptions):
    backbone_lr_scale: float = 0.01  # bcb_lrscale; 0 freezes the backbone (the reference's fix_bcb)
    ca_epochs: int = 5  # classifier-alignment epochs (the authors' cifar config; LAMDA-PILOT's uses 3)
    ca_samples: int = 256  # features sampled per class and epoch, also the alignment's batch size
    ca_lr: float | None = None  # None: train.lr (the reference aligns at the task's lr)
    logit_norm: float | None = 0.1  # tau of the normalised logits (ca_with_logit_norm); null: plain logits
    cov_eps: float = 1e-4  # added to each class covariance's diagonal
    mean_scale: bool = True  # the reference's task-dependent 0.9 + 0.1 (task + 1) / (t + 1) on sampled means

    def validate(self, key: str) -> None:
        if self.backbone_lr_scale < 0:
            raise ConfigError(f"{key}.backbone_lr_scale: expected a factor >= 0, got {self.backbone_lr_scale}")
        if self.ca_epochs < 0:
            raise ConfigError(f"{key}.ca_epochs: expected >= 0 epochs, got {self.ca_epochs}")
        if self.ca_samples < 1:
            raise ConfigError(f"{key}.ca_samples: expected >= 1 samples per class, got {self.ca_samples}")
        if self.logit_norm is not None and self.logit_norm <= 0:
            raise ConfigError(f"{key}.logit_norm: expected a temperature > 0 or null, got {self.logit_norm}")
        if self.ca_lr is not None and self.ca_lr <= 0:
            raise ConfigError(f"{key}.ca_lr: expected an lr > 0 or null, got {self.ca_lr}")
        if self.cov_eps < 0:
            raise ConfigError(f"{key}.cov_eps: expected >= 0, got {self.cov_eps}")


def class_gaussians(feats: torch.Tensor, labels: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(classes (K,) sorted, means (K, d) float64, covariances (K, d, d) float64): per class the mean and the
    unbiased covariance (N - 1) of its rows, plus eps on the diagonal."""
    feats = feats.double()
    classes = labels.unique(sorted=True)
    means, covs = [], []
    eye = torch.eye(feats.shape[1], dtype=torch.float64, device=feats.device)
    for c in classes.tolist():
        f = feats[labels == c]
        means.append(f.mean(0))
        covs.append(torch.cov(f.T).reshape(feats.shape[1], feats.shape[1]) + eps * eye)
    return classes, torch.stack(means), torch.stack(covs)


def sample_features(means: torch.Tensor, covs: torch.Tensor, n: int,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(C * n, d) float32 features, n per class drawn from N(means[c], covs[c]) in class order, and their labels."""
    chol = torch.linalg.cholesky(covs.double()).float()
    z = torch.randn(means.shape[0], n, means.shape[1], generator=generator, device=means.device)
    x = means.float()[:, None, :] + z @ chol.transpose(1, 2)
    y = torch.arange(means.shape[0], device=means.device).repeat_interleave(n)
    return x.flatten(0, 1), y


def alignment_loss(logits: torch.Tensor, y: torch.Tensor, bounds: list[int], tau: float | None) -> torch.Tensor:
    """Cross-entropy of the logits divided by the mean over tasks of each task block's L2 norm and by tau
    (`bounds`: the class offsets of the tasks and the number of seen classes); plain cross-entropy without tau."""
    if tau is None:
        return F.cross_entropy(logits, y)
    norms = torch.stack([logits[:, lo:hi].norm(dim=1) + 1e-7 for lo, hi in zip(bounds[:-1], bounds[1:])], dim=1)
    return F.cross_entropy(logits / norms.mean(dim=1, keepdim=True) / tau, y)


@register_method("slca")
class SLCA(Method[SLCAOptions]):
    settings = frozenset({"class-il"})
    hard_labels = True  # the task's head alone sees its labels

    def __init__(self, cfg, scenario, device):
        self.means: torch.Tensor | None = None  # (seen, d) float64
        self.covs: torch.Tensor | None = None  # (seen, d, d) float32, as the reference keeps them
        self.head_before_ca: dict | None = None  # the heads before the last alignment, recalled by the next task
        super().__init__(cfg, scenario, device)

    def build_model(self) -> nn.Module:
        backbone = create_backbone(self.cfg.model, self.scenario.train.image_size, self.scenario.train.channels)
        return Classifier(backbone, GrowingHead(backbone.num_features))

    def begin_task(self, task):
        super().begin_task(task)
        head = cast(GrowingHead, self.model.head)
        if self.head_before_ca is not None:
            head.load_state_dict(self.head_before_ca)
            self.head_before_ca = None
        fc = cast(TaskHead, head.add_task(task.num_classes).to(self.device)).fc
        trunc_normal_(fc.weight, std=0.02)
        nn.init.zeros_(fc.bias)

    def setup_phase(self, phase, task):
        model = cast(Classifier, self.model)
        model.requires_grad_(True)
        model.backbone.requires_grad_(self.opts.backbone_lr_scale > 0)
        for old in cast(GrowingHead, model.head).heads[: task.index]:
            old.requires_grad_(False)
        model.train()

    def lr_scales(self, phase, task):
        return {"backbone": self.opts.backbone_lr_scale} if self.opts.backbone_lr_scale > 0 else {}

    def loss(self, batch, phase, task):
        loss = task_cross_entropy(self.model(batch.x), batch, task.offset)
        return loss, {}

    def logits(self, x, task=None):
        return self.model(x, task)

    def embed(self, x):
        return cast(Classifier, self.model).backbone(x)

    # ------------------------------------------------------------------ statistics and alignment
    def consolidate(self, task, ctx):
        model = cast(Classifier, self.model)
        self.head_before_ca = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
        feats = ctx.extract(task.train_idx, self.embed)
        labels = self.scenario.train_labels[task.train_idx].to(feats.device)
        classes, mu, cov = class_gaussians(feats, labels, self.opts.cov_eps)
        d = mu.shape[1]
        means = torch.zeros(task.end, d, dtype=torch.float64, device=self.device)
        covs = torch.zeros(task.end, d, d, device=self.device)
        if self.means is not None and self.covs is not None:
            means[: task.offset], covs[: task.offset] = self.means[: task.offset], self.covs[: task.offset]
        means[classes.to(self.device)], covs[classes.to(self.device)] = mu.to(self.device), cov.float().to(self.device)
        self.means, self.covs = means, covs
        if task.index > 0 and self.opts.ca_epochs > 0:
            self.align(task)

    def sampling_means(self, task) -> torch.Tensor:
        """The means the alignment samples around: each scaled by 0.9 + 0.1 (its task + 1) / (t + 1)."""
        means = cast(torch.Tensor, self.means)
        if not self.opts.mean_scale:
            return means
        tasks = self.scenario.task_of_label[: task.end].to(means.device, torch.float64)
        return means * (0.9 + 0.1 * (tasks + 1) / (task.index + 1))[:, None]

    def align(self, task) -> None:
        """The classifier alignment: SGD on every head over sampled features, cosine over the epochs to 0."""
        head = cast(Classifier, self.model).head
        head.requires_grad_(True)
        t = self.cfg.train
        lr0 = self.opts.ca_lr if self.opts.ca_lr is not None else t.lr
        opt = torch.optim.SGD(head.parameters(), lr=lr0, momentum=t.momentum, weight_decay=t.weight_decay)
        bounds = [self.scenario[i].offset for i in range(task.index + 1)] + [task.end]
        means, covs = self.sampling_means(task), cast(torch.Tensor, self.covs)
        n, epochs = self.opts.ca_samples, self.opts.ca_epochs
        for epoch in range(epochs):
            for g in opt.param_groups:
                g["lr"] = 0.5 * lr0 * (1 + math.cos(math.pi * epoch / epochs))
            x, y = sample_features(means, covs, n)
            order = torch.randperm(len(y), device=y.device)
            for b in order.split(n):
                loss = alignment_loss(head(x[b]), y[b], bounds, self.opts.logit_norm)
                opt.zero_grad()
                loss.backward()
                opt.step()

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        head = None if self.head_before_ca is None else {k: v.cpu() for k, v in self.head_before_ca.items()}
        return {"means": _moved(self.means, "cpu"), "covs": _moved(self.covs, "cpu"), "head_before_ca": head}

    def load_extra_state(self, state: dict) -> None:
        self.means, self.covs = _moved(state.get("means"), self.device), _moved(state.get("covs"), self.device)
        head = state.get("head_before_ca")
        self.head_before_ca = None if head is None else {k: v.to(self.device).clone() for k, v in head.items()}


def _moved(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
