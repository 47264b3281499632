"""DER without pruning (Yan et al., CVPR 2021): a new feature extractor per task over frozen old ones.

Per task t (facts, sources and the differences between code and paper: docs/methods/der.md):
- grow: a new extractor (a backbone from `model`, initialised from the previous one's weights), the old ones
  frozen with their BatchNorm in eval mode; one classifier over the concatenation of all extractors' features and
  all seen classes, rebuilt each task (fresh, as the authors' config; `classifier_init: copy_old` copies the old
  classes' weights over the old features, as PyCIL); for t >= 1 an auxiliary classifier (|C_t| + 1 outputs: the new
  classes and one "old" class) on the new extractor's features, training only, not counted in #P.
- phase "train" on the task's data + the memory:  CE(classifier) + aux_weight * CE(aux classifier).
- memory: herding on the concatenated features.
- the classifier stage at the end of t >= 1: `retrain` (the paper and the authors' code: the classifier
  re-initialised and trained alone on the balanced memory with CE(logits / T)), `weight_align` (PyCIL: the new
  classes' weight vectors rescaled to the old classes' mean norm) or `none`.
Pruning (DER with masks) is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import create_backbone
from .base import Method, MethodOptions, Phase, register_method


# --------------------------------------------------------------------------------------------- post-hoc steps
def align_weights(weight: torch.Tensor, n_new: int) -> torch.Tensor:
    """Weight aligning: the last n_new rows times gamma = mean_i ||w_old_i|| / mean_j ||w_new_j|| (a new tensor)."""
    old, new = weight[:-n_new], weight[-n_new:]
    gamma = old.norm(dim=1).mean() / new.norm(dim=1).mean()
    return torch.cat([old, new * gamma])


def auxiliary_targets(y: torch.Tensor, n_old: int) -> torch.Tensor:
    """Labels of the |C_t| + 1 auxiliary outputs: 0 for every old class, 1..|C_t| for the new ones."""
    return torch.where(y < n_old, torch.zeros_like(y), y - n_old + 1)


# --------------------------------------------------------------------------------------------- the network
class DERNet(nn.Module):
    """Extractors side by side; `fc` over their concatenated features; `aux` on the newest one's (training only)."""

    def __init__(self, make_extractor, bias: bool):
        super().__init__()
        self.make_extractor, self.bias = make_extractor, bias
        self.extractors = nn.ModuleList()
        self.fc: nn.Linear | None = None
        self.aux: nn.Linear | None = None

    @property
    def dim(self) -> int:
        total = 0
        for e in self.extractors:
            total += int(e.num_features)  # type: ignore[arg-type]
        return total

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([e(x) for e in self.extractors], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc is None:
            raise RuntimeError("DERNet: begin_task adds the classifier before the first forward")
        return self.fc(self.features(x))

    def linear(self, n_in: int, n_out: int) -> nn.Linear:
        """The authors' classifiers: Kaiming-normal weights (gain 1: std 1/sqrt(n_in)), zero bias."""
        fc = nn.Linear(n_in, n_out, bias=self.bias)
        nn.init.kaiming_normal_(fc.weight, nonlinearity="linear")
        if fc.bias is not None:
            nn.init.zeros_(fc.bias)
        return fc


@dataclass
class DEROptions(MethodOptions):
    aux_weight: float = 1.0  # lambda_a of the paper; 0 drops the auxiliary classifier
    extractor_init: Literal["previous", "fresh"] = "previous"  # previous: the authors' code and PyCIL
    classifier_init: Literal["fresh", "copy_old"] = "fresh"  # fresh: the authors' config (reuse_oldfc false)
    bias: bool = False  # the authors' classifiers have none (use_bias false); PyCIL's have one
    classifier_stage: Literal["retrain", "weight_align", "none"] = "retrain"
    retrain_epochs: int = 30
    retrain_lr: float = 0.1
    retrain_milestones: list[int] = field(default_factory=lambda: [15])
    retrain_weight_decay: float = 5.0e-4
    retrain_temperature: float = 5.0  # the authors' CIFAR config; 1.0 on ImageNet
    retrain_batch_size: int = 128

    def validate(self, key: str) -> None:
        if self.aux_weight < 0 or self.retrain_lr < 0 or self.retrain_weight_decay < 0:
            raise ConfigError(f"{key}: aux_weight, retrain_lr and retrain_weight_decay must be >= 0")
        if self.retrain_temperature <= 0:
            raise ConfigError(f"{key}.retrain_temperature: expected a positive temperature, "
                              f"got {self.retrain_temperature}")
        if self.retrain_epochs < 0 or self.retrain_batch_size < 1:
            raise ConfigError(f"{key}: retrain_epochs must be >= 0 and retrain_batch_size >= 1")


@register_method("der")
class DER(Method[DEROptions]):
    model: DERNet
    uses_memory = True
    hard_labels = True
    settings = frozenset({"class-il"})

    def __init__(self, cfg, scenario, device):
        self.reset_for = -1  # the task whose classifier the retraining phase has re-initialised (resume-safe)
        super().__init__(cfg, scenario, device)

    def build_model(self) -> nn.Module:
        s = self.scenario.train
        return DERNet(lambda: create_backbone(self.cfg.model, s.image_size, s.channels), self.opts.bias)

    # ------------------------------------------------------------------ growth
    def begin_task(self, task):
        n_old = self.seen
        super().begin_task(task)
        m, o = self.model, self.opts
        new = m.make_extractor().to(self.device)
        if len(m.extractors) and o.extractor_init == "previous":
            new.load_state_dict(m.extractors[-1].state_dict())
        old_fc, old_dim = m.fc, m.dim
        m.extractors.append(new)
        fc = m.linear(m.dim, task.end).to(self.device)
        if old_fc is not None and o.classifier_init == "copy_old":
            with torch.no_grad():
                fc.weight[:n_old, :old_dim] = old_fc.weight
                if fc.bias is not None and old_fc.bias is not None:
                    fc.bias[:n_old] = old_fc.bias
        m.fc = fc
        m.aux = m.linear(new.num_features, task.num_classes + 1).to(self.device) \
            if task.index > 0 and o.aux_weight > 0 else None

    def phases(self, task):
        phases = [Phase.from_train("train", "task+memory", self.cfg.train, task.index)]
        o = self.opts
        if task.index > 0 and o.classifier_stage == "retrain" and o.retrain_epochs > 0 and self.memory.enabled:
            phases.append(Phase.from_train(
                "retrain", "memory", self.cfg.train, task.index, epochs=o.retrain_epochs,
                batch_size=o.retrain_batch_size,
                drop_last=False, optimizer="sgd", lr=o.retrain_lr, momentum=0.9, nesterov=False,
                weight_decay=o.retrain_weight_decay, schedule="multistep", milestones=list(o.retrain_milestones),
                gamma=0.1, warmup_epochs=0, lr_step="epoch-start"))
        return phases

    def setup_phase(self, phase, task):
        m = self.model
        if phase.name == "retrain":
            m.requires_grad_(False).eval()
            if self.reset_for != task.index:  # once per task, not again on resume
                m.fc = m.linear(m.dim, task.end).to(self.device)
                self.reset_for = task.index
            m.fc.requires_grad_(True)
            return
        m.requires_grad_(True).train()
        for e in list(m.extractors)[:-1]:
            e.requires_grad_(False).eval()

    # ------------------------------------------------------------------ losses
    def loss(self, batch, phase, task):
        m = self.model
        feats = m.features(batch.x)
        logits = m.fc(feats)
        if phase.name == "retrain":
            ce = F.cross_entropy(logits / self.opts.retrain_temperature, batch.y)
            return ce, {"ce": ce.detach()}
        ce = F.cross_entropy(logits, batch.y)
        loss, logs = ce, {"ce": ce.detach()}
        if m.aux is not None:
            new = feats[:, -m.extractors[-1].num_features:]
            aux = F.cross_entropy(m.aux(new), auxiliary_targets(batch.y, task.offset))
            loss = loss + self.opts.aux_weight * aux
            logs["aux"] = aux.detach()
        return loss, logs

    def logits(self, x, task=None):
        return self.model(x)

    def embed(self, x):
        """Herding features: all extractors' features concatenated (the selector L2-normalises them)."""
        return self.model.features(x)

    def consolidate(self, task, ctx):
        if task.index > 0 and self.opts.classifier_stage == "weight_align":
            fc = self.model.fc
            with torch.no_grad():
                fc.weight.copy_(align_weights(fc.weight, task.num_classes))

    # ------------------------------------------------------------------ state, accounting
    def state_dict(self) -> dict:
        # the aux head is rebuilt by begin_task; the extractors and classifier are in the model's state
        return {**super().state_dict(), "reset_for": self.reset_for}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.reset_for = state.get("reset_for", -1)

    def inference_modules(self) -> nn.Module:
        m = self.model
        return nn.ModuleList([m.extractors, *([m.fc] if m.fc is not None else [])])

    def reference_count(self) -> float | None:
        e = self.model.extractors[0]
        dim = int(e.num_features)  # type: ignore[arg-type]
        return float(sum(p.numel() for p in e.parameters()) + dim * self.seen + self.seen * int(self.opts.bias))
