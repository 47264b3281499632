"""UCIR / LUCIR (Hou et al., CVPR 2019): a cosine-normalised classifier, the less-forget constraint and margin
ranking on hard negatives, over a backbone without the last ReLU.

Per task t (facts, sources and the differences between code and paper: docs/methods/ucir.md):
- grow: the new classes' weight vectors in the cosine classifier (one block per task, the old blocks frozen while
  t trains, as the reference's SplitCosineLinear with the old part at lr 0), imprinted (`imprint`) with the
  normalised mean of the new classes' normalised features times the old vectors' mean norm; a teacher, the frozen
  model taken before the expansion.
- phase "train" on the task's data + the memory, for t >= 1:
      CE(sigma * cos) + lam * mean(1 - cos(f(x), f_old(x))) + mr_weight * margin ranking (old-class rows, K hard
      new-class negatives),   lam = lambda_base * sqrt(n_old / n_new);
  t = 0: CE(sigma * cos) alone.
- memory: herding on the features.
- phase "cbf" (`cbf_epochs` > 0, t >= 1): class-balanced finetuning of the classifier on the memory.
Scores: the classifier's (CNN). The normalised features for NME scoring come from `embed`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import create_backbone
from .base import Method, MethodOptions, Phase, register_method
from .losses import hard_negative_margin_ranking, less_forget
from .nme import NMEScorer


class CosineClassifier(nn.Module):
    """sigma * cos(x, w_c) over all seen classes; one weight block per task, one learned scale sigma."""

    def __init__(self, in_features: int, sigma: float = 1.0, learn_sigma: bool = True):
        super().__init__()
        self.in_features = in_features
        self.blocks = nn.ParameterList()
        self.sigma = nn.Parameter(torch.tensor(float(sigma)), requires_grad=learn_sigma)
        self.learn_sigma = learn_sigma

    def add_task(self, n: int) -> nn.Parameter:
        """A block of n weight vectors, uniform in +-1/sqrt(in_features) (the reference's CosineLinear init)."""
        ref = self.sigma
        w = torch.empty(n, self.in_features, device=ref.device, dtype=ref.dtype)
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(w, -bound, bound)
        p = nn.Parameter(w)
        self.blocks.append(p)
        return p

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat(list(self.blocks), dim=0)

    def cosines(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.cosines(x)


class CosineNet(nn.Module):
    def __init__(self, backbone: nn.Module, head: CosineClassifier):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def imprinted_weights(features: torch.Tensor, labels: torch.Tensor, classes: range,
                      old_weight: torch.Tensor) -> torch.Tensor:
    """One row per new class: normalise(mean of the class's normalised features) x the old rows' mean norm."""
    f = F.normalize(features.float(), dim=1)
    scale = old_weight.float().norm(dim=1).mean()
    rows = [F.normalize(f[labels == c].mean(0), dim=0) * scale for c in classes]
    return torch.stack(rows).to(old_weight.dtype)


@dataclass
class UCIROptions(MethodOptions):
    lambda_base: float = 5.0  # the paper: 5 on CIFAR-100, 10 on ImageNet
    adaptive_lambda: bool = True  # lam = lambda_base * sqrt(n_old / n_new)
    margin: float = 0.5  # the reference's `dist`
    k: int = 2  # hard negatives per old-class sample
    mr_weight: float = 1.0  # the reference's `lw_mr`
    sigma_init: float = 1.0  # the reference's CosineLinear fills sigma with 1
    learn_sigma: bool = True
    imprint: bool = True
    freeze_old_weights: bool = True  # the reference trains the old classes' block at lr 0 when less-forget is on
    cbf_epochs: int = 0  # >0: class-balanced finetuning (the reference's cbf script: 20 epochs)
    cbf_lr: float = 0.01
    cbf_milestones: list[int] = field(default_factory=lambda: [10])

    def validate(self, key: str) -> None:
        for name in ("lambda_base", "margin", "mr_weight", "cbf_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: expected a value >= 0, got {getattr(self, name)}")
        if self.k < 1:
            raise ConfigError(f"{key}.k: expected at least 1 hard negative, got {self.k}")
        if self.sigma_init <= 0:
            raise ConfigError(f"{key}.sigma_init: expected a positive scale, got {self.sigma_init}")
        if self.cbf_epochs < 0:
            raise ConfigError(f"{key}.cbf_epochs: expected a value >= 0, got {self.cbf_epochs}")


@register_method("ucir")
class UCIR(Method[UCIROptions]):
    model: CosineNet
    uses_memory = True
    hard_labels = True
    settings = frozenset({"class-il"})

    def __init__(self, cfg, scenario, device):
        self.teacher: CosineNet | None = None
        self.pending: torch.Tensor | None = None  # imprinted weights for the next task, computed at this task's end
        self.nme = NMEScorer()  # the paper's NME row, beside the cosine classifier's (CNN) scores
        super().__init__(cfg, scenario, device)

    def build_model(self) -> nn.Module:
        s = self.scenario.train
        backbone = create_backbone(self.cfg.model, s.image_size, s.channels)
        return CosineNet(backbone, CosineClassifier(backbone.num_features, self.opts.sigma_init, self.opts.learn_sigma))

    def lam(self, task) -> float:
        o = self.opts
        return o.lambda_base * math.sqrt(task.offset / task.num_classes) if o.adaptive_lambda else o.lambda_base

    # ------------------------------------------------------------------ growth
    def begin_task(self, task):
        super().begin_task(task)
        if task.index > 0:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        block = self.model.head.add_task(task.num_classes)
        if self.pending is not None and self.opts.imprint and task.index > 0:
            with torch.no_grad():
                block.copy_(self.pending.to(block.device))
        self.pending = None

    def phases(self, task):
        phases = [Phase.from_train("train", "task+memory", self.cfg.train, task.index)]
        o = self.opts
        if task.index > 0 and o.cbf_epochs > 0 and self.memory.enabled:
            phases.append(Phase.from_train("cbf", "memory", self.cfg.train, task.index, epochs=o.cbf_epochs,
                                           lr=o.cbf_lr, schedule="multistep", milestones=list(o.cbf_milestones),
                                           gamma=0.1, warmup_epochs=0))
        return phases

    def setup_phase(self, phase, task):
        m = self.model
        if phase.name == "cbf":
            m.requires_grad_(False).eval()
            m.head.requires_grad_(True)
            m.head.sigma.requires_grad_(self.opts.learn_sigma)
            return
        m.requires_grad_(True).train()
        m.head.sigma.requires_grad_(self.opts.learn_sigma)
        if task.index > 0 and self.opts.freeze_old_weights:
            for p in list(m.head.blocks)[:-1]:
                p.requires_grad_(False)

    # ------------------------------------------------------------------ losses
    def loss(self, batch, phase, task):
        m, o = self.model, self.opts
        f = m.backbone(batch.x)
        cos = m.head.cosines(f)
        ce = F.cross_entropy(m.head.sigma * cos, batch.y)
        loss, logs = ce, {"ce": ce.detach()}
        if phase.name != "train" or self.teacher is None:
            return loss, logs
        with torch.no_grad():
            f_old = self.teacher.backbone(batch.x)
        lf = less_forget(f, f_old)
        mr = hard_negative_margin_ranking(cos, batch.y, task.offset, o.k, o.margin)
        loss = loss + self.lam(task) * lf + o.mr_weight * mr
        logs.update(lf=lf.detach(), mr=mr.detach())
        return loss, logs

    def logits(self, x, task=None):
        return self.model(x)

    def embed(self, x):
        """L2-normalised features: herding's input and what NME scoring compares with class means."""
        return F.normalize(self.model.backbone(x), dim=1)

    def extra_scorers(self) -> tuple[str, ...]:
        return ("nme",)

    def scores(self, x):
        feats = self.model.backbone(x)
        return self.model.head(feats), {"nme": self.nme(feats, self.seen)}

    def consolidate(self, task, ctx):
        """The class means of the memory for NME scoring. Imprinting needs the model as it is before the next task
        trains, i.e. as it is now: the next task's imprinted weights are computed here (its training images, test
        transform) and installed by begin_task."""
        rows = self.memory.indices()
        self.nme.update(ctx, rows, self.scenario.train_labels[rows], self.embed, self.seen, True)
        nxt = task.index + 1
        if not self.opts.imprint or nxt >= len(self.scenario):
            return
        t = self.scenario[nxt]
        feats = ctx.extract(t.train_idx, self.model.backbone)
        labels = self.scenario.train_labels[t.train_idx].to(feats.device)
        self.pending = imprinted_weights(feats, labels, range(t.offset, t.end), self.model.head.weight.detach())

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "pending": self.pending, "nme": self.nme.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if state.get("teacher") is not None and self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.pending = state.get("pending")
        self.nme.load_state_dict(state.get("nme", {}), self.device)
