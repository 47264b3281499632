"""E2E / EEIL, end-to-end incremental learning (Castro et al., ECCV 2018): cross-distilled loss over every old
task's logits, then a class-balanced finetuning with a temporary distillation of the new classes, and the paper's
brightness / contrast augmentation. Equations, defaults and sources: docs/methods/e2e.md.

Per task t >= 1:
- phase "train" on the task's data + the memory:
      CE(logits, y) + kd_weight * sum_{s < t} KD_T(logits[:, C_s], teacher[:, C_s])
  KD_T = -mean_i sum_{c in C_s} softmax(teacher/T) log softmax(logits/T), each task's softmax over its own columns.
- phase "balanced": m rows of every seen class (m = the memory's per-class budget after this task: the first m
  exemplars of each old class, a seeded random m of each new class), lr finetune_lr, finetune_epochs:
      the same loss + kd_weight * KD_T(logits[:, C_t], finetune_teacher[:, C_t])
  with finetune_teacher the model as it was when the balanced phase began (kept for this phase only).
- memory update (herding) after both phases, as the paper orders them.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.transfer import to_device
from ..errors import ConfigError
from .base import register_method
from .distilled import Distilled, DistilledOptions
from .losses import classification_loss, grouped_distillation, soft_distillation


# --------------------------------------------------------------------------------------------- augmentation
def adjust_brightness_contrast(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, delta: torch.Tensor,
                               factor: torch.Tensor) -> torch.Tensor:
    """On a normalised batch (B, C, H, W), what on its 0..255 pixels would be: p + delta_i (brightness, clamped
    to 0..255), then (p - mean_hw(p)) * factor_i + mean_hw(p) per channel (contrast, clamped); re-normalised."""
    mean, std = to_device(mean, x.device, x.dtype), to_device(std, x.device, x.dtype)
    u = x * std + mean  # 0..1
    u = (u + delta.to(x.dtype).view(-1, 1, 1, 1) / 255).clamp(0, 1)  # drawn on x's device
    mu = u.mean(dim=(2, 3), keepdim=True)
    u = ((u - mu) * factor.to(x.dtype).view(-1, 1, 1, 1) + mu).clamp(0, 1)
    return (u - mean) / std


def random_brightness_contrast(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, brightness: float,
                               contrast: tuple[float, float], p: float) -> torch.Tensor:
    """Per image, with probability p a brightness shift uniform in [-brightness, brightness] grey levels, and
    independently with probability p a contrast factor uniform in `contrast`; the rest pass unchanged."""
    B = x.shape[0]
    dev = x.device
    delta = (torch.rand(B, device=dev) * 2 - 1) * brightness
    delta = torch.where(torch.rand(B, device=dev) < p, delta, torch.zeros_like(delta))
    lo, hi = contrast
    factor = lo + torch.rand(B, device=dev) * (hi - lo)
    factor = torch.where(torch.rand(B, device=dev) < p, factor, torch.ones_like(factor))
    return adjust_brightness_contrast(x, mean, std, delta, factor)


# --------------------------------------------------------------------------------------------- balanced subset
def balanced_subset(old: dict[int, torch.Tensor], new_rows: torch.Tensor, new_labels: torch.Tensor, m: int,
                    seed: int) -> torch.Tensor:
    """The first m stored exemplars of each old class and a seeded random m rows of each new class, in label order."""
    g = torch.Generator().manual_seed(seed)
    parts = [old[c][:m] for c in sorted(old)]
    new_rows, new_labels = new_rows.cpu(), new_labels.cpu()
    for c in new_labels.unique(sorted=True).tolist():
        mine = new_rows[new_labels == c]
        parts.append(mine[torch.randperm(len(mine), generator=g)[:m]])
    return torch.cat(parts) if parts else new_rows[:0]


# --------------------------------------------------------------------------------------------- the method
@dataclass
class E2EOptions(DistilledOptions):
    kd_weight: float = 1.0  # the distillation terms' weight (1 in the paper; FACIL's lamb)
    finetune_epochs: int = 30  # the balanced finetuning (0: none)
    finetune_lr: float = 0.01  # scaled like train.lr
    finetune_milestones: list[int] = field(default_factory=lambda: [10, 20])  # lr / 10 at these epochs
    finetune_new_distillation: bool = True  # the temporary distillation of the new classes while finetuning
    color_augment: bool = True  # the paper's brightness and contrast (crop and mirror: data.augment)
    brightness: float = 63.0  # grey levels, uniform in [-b, b]
    contrast: list[float] = field(default_factory=lambda: [0.2, 1.8])
    color_p: float = 0.5  # probability of each of the two per image

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.kd_weight < 0 or self.finetune_lr < 0 or self.finetune_epochs < 0 or self.brightness < 0:
            raise ConfigError(f"{key}: kd_weight, finetune_lr, finetune_epochs and brightness must be >= 0")
        if len(self.contrast) != 2 or not 0 <= self.contrast[0] <= self.contrast[1]:
            raise ConfigError(f"{key}.contrast: expected [low, high] with 0 <= low <= high, got {self.contrast}")
        if not 0 <= self.color_p <= 1:
            raise ConfigError(f"{key}.color_p: expected a probability in [0, 1], got {self.color_p}")


@register_method("e2e")
class E2E(Distilled):
    opts: E2EOptions
    Options = E2EOptions

    def __init__(self, cfg, scenario, device):
        self.finetune_teacher: nn.Module | None = None
        super().__init__(cfg, scenario, device)
        a, ch = cfg.data.augment, scenario.train.channels
        mean, std = list(a.mean or scenario.mean), list(a.std or scenario.std)
        if len(mean) == 1 and ch > 1:
            mean, std = mean * ch, std * ch
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    def begin_task(self, task):
        super().begin_task(task)
        self.finetune_teacher = None

    def phases(self, task):
        phases = [self.train_phase(task)]
        o = self.opts
        if task.index > 0 and o.finetune_epochs > 0 and self.memory.enabled:  # no memory: no balanced subset
            lr = self.cfg.train.scaled_lr(o.finetune_lr)
            phases.append(self.train_phase(task, "balanced", epochs=o.finetune_epochs, lr=lr, schedule="multistep",
                                           milestones=list(o.finetune_milestones), gamma=0.1, warmup_epochs=0))
        return phases

    def phase_rows(self, phase, task, rows):
        if phase.name != "balanced":
            return rows
        m = self.memory.budget.per_class(task.end)
        seed = int(hashlib.sha256(repr((self.cfg.run.seed, task.index, "e2e-balanced")).encode()).hexdigest()[:15], 16)
        return balanced_subset(self.memory.exemplars, task.train_idx, self.scenario.train_labels[task.train_idx],
                               m, seed)

    def setup_phase(self, phase, task):
        super().setup_phase(phase, task)
        if phase.name == "balanced" and self.finetune_teacher is None and self.opts.finetune_new_distillation:
            self.finetune_teacher = copy.deepcopy(self.model).eval().requires_grad_(False)

    def end_task(self, task):
        self.finetune_teacher = None  # the temporary teacher of this task's balanced phase only

    def old_bounds(self, task) -> list[int]:
        bounds = [0]
        for s in range(task.index):
            bounds.append(bounds[-1] + self.scenario[s].num_classes)
        return bounds

    def loss(self, batch, phase, task):
        o = self.opts
        x = batch.x
        if o.color_augment:
            x = random_brightness_contrast(x, self.mean, self.std, o.brightness, (o.contrast[0], o.contrast[1]),
                                           o.color_p)
        logits = self.model(x)
        ce = classification_loss(logits, batch)
        loss, logs = ce, {"cls": ce.detach()}
        if self.teacher is not None:
            with torch.no_grad():
                old = self.teacher(x)
            kd = grouped_distillation(logits[:, :task.offset], old, self.old_bounds(task), o.temperature)
            loss = loss + o.kd_weight * kd
            logs["kd"] = kd.detach()
        if phase.name == "balanced" and self.finetune_teacher is not None:
            with torch.no_grad():
                ref = self.finetune_teacher(x)[:, task.offset:]
            kd_new = soft_distillation(logits[:, task.offset:], ref, o.temperature)
            loss = loss + o.kd_weight * kd_new
            logs["kd_new"] = kd_new.detach()
        return loss, logs

    def extra_state(self) -> dict:
        ft = self.finetune_teacher
        return {**super().extra_state(), "finetune_teacher": ft.state_dict() if ft is not None else None}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if state.get("finetune_teacher") is not None:
            self.finetune_teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.finetune_teacher.load_state_dict(state["finetune_teacher"])
