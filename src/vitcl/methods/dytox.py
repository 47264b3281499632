"""DyTox (Douillard et al., CVPR 2022) and DyTox+: dynamic task-token expansion over a shared ConViT.

Per task t (facts and sources: docs/methods/dytox.md):
- grow: a new task token and a new classifier (LayerNorm + Linear over the task's classes); for t >= 1 a
  divergence head (|C_t| + 1 outputs on the newest token, rebuilt each task, training only, not counted in #P)
  and a teacher, the frozen copy of the model taken before the expansion.
- phase "train" on the task's data + the memory: old tokens and old classifiers frozen; loss
      (1 - lam) * BCE(logits, one-hot) + lam * tau^2 * KL(softmax(teacher / tau) || softmax(student_old / tau))
      + 0.1 * BCE(div logits, div targets),        lam = n_old / n_seen,
  the KL over the old classes' logits on every sample, `kl_div(..., reduction='mean', log_target=True)`
  (an element-wise mean over B x n_old, as published; `kd_reduction: batchmean` divides by B only, and
  `kd_samples: memory` restricts it to old-class samples, as LPA does).
- memory update: iCaRL herding on the L2-normalised concatenation of all task embeddings; with `memory.ranks: N`
  (the public code's per-process memory) once per emulated rank, each on its own bank.
- phase "finetune" (t >= 1) on the balanced memory: encoder (patch + positional embedding, SABs) frozen; the
  decoder, all tokens and all classifiers trained at a constant lr; classification loss only (with
  `finetune_distillation`, also the distillation, as LPA's recipe does; never the divergence loss).
The paper's model ablation switches parts off (docs/methods/dytox.md#model-ablation): `task_tokens: shared` keeps
the one class token for every task (nothing frozen among tokens, the decoder run once), `heads: shared` one
classifier over all seen classes on the concatenated embeddings (trained whole, old classes included),
`distillation: false`, `finetune_epochs: 0`, `divergence_weight: 0`.
DyTox+ is DyTox with MixUp (alpha 0.8) and label smoothing 0.1 (`data.augment`): the loss is then the BCE on the
mixed soft targets, and the divergence targets are [sum of the old classes' mass, the new classes' masses].

Two choices where the public code and its intent differ (both options, defaults said here):
- `frozen_encoder_mode: train` (default, as published): the frozen SABs stay in training mode during finetuning,
  so their drop-path stays active (the public code calls `.eval()` on them and then `model.train()` again);
  `eval` turns it off.
- `finetune_order: shuffled` (default): the memory is reshuffled every finetuning epoch. `stored_drop_last` is
  the published `ft_no_sampling` behaviour: the memory in stored order (grouped by class), the last incomplete
  batch dropped, so with a small memory an epoch is one step on the same samples.
  `finetune_drop_last: true` drops the last partial batch of a shuffled finetuning (LPA's loader).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import MODELS, create_backbone
from ..models.convit import ConViT
from ..models.dytox import DyToxNet
from .base import Batch, Method, MethodOptions, Phase, register_method
from .losses import distillation, masked_distillation, soft_cross_entropy


# --------------------------------------------------------------------------------------------- losses
def dense_targets(batch: Batch, num_classes: int) -> torch.Tensor:
    """The batch's MixUp/CutMix soft targets when mixed, else one-hot labels."""
    if batch.soft is not None:
        return batch.soft
    return F.one_hot(batch.y, num_classes).to(torch.float32)


def classification(logits: torch.Tensor, targets: torch.Tensor,
                   kind: Literal["bce", "softmax"] = "bce") -> torch.Tensor:
    """bce: sigmoid + binary cross-entropy, mean over B x C (DyTox); softmax: soft-target cross-entropy."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    return soft_cross_entropy(logits, targets)


def divergence_targets(batch: Batch, n_old: int, n_new: int) -> torch.Tensor:
    """Targets of the |C_t| + 1 divergence outputs: index 0 for every old class, 1..|C_t| for the new ones;
    with mixed targets, [sum of the old classes' mass, the new classes' masses]."""
    if batch.soft is not None:
        return torch.cat([batch.soft[:, :n_old].sum(1, keepdim=True), batch.soft[:, n_old:n_old + n_new]], dim=1)
    y = torch.where(batch.y < n_old, torch.zeros_like(batch.y), batch.y - n_old + 1)
    return F.one_hot(y, n_new + 1).to(torch.float32)


# --------------------------------------------------------------------------------------------- the method
@dataclass
class DyToxOptions(MethodOptions):
    # softmax: what DyTox+ used before 2022-05 (docs/methods/dytox.md#public-code-versus-paper)
    classification: Literal["bce", "softmax"] = "bce"
    divergence_weight: float = 0.1  # head_div; 0 removes the divergence head
    distillation: bool = True  # auto_kd
    distillation_tau: float = 1.0
    kd_reduction: Literal["mean", "batchmean"] = "mean"
    kd_samples: Literal["all", "memory"] = "all"  # memory: old-class samples only (LPA)
    finetune_epochs: int = 20  # 0: no finetuning phase
    finetune_lr: float = 5.0e-5  # scaled like train.lr (x train.batch_size / train.lr_scale_batch)
    finetune_order: Literal["shuffled", "stored_drop_last"] = "shuffled"
    finetune_drop_last: bool = False  # LPA's recipe: drop finetuning's last partial batch (stored_drop_last drops it)
    frozen_encoder_mode: Literal["train", "eval"] = "train"
    repeated_augmentation: int = 1  # 3 in the public code (DeiT's RASampler) for the "train" phase
    repeated_augmentation_mode: Literal["deit", "extend"] = "deit"  # deit: epochs keep their length
    finetune_distillation: bool = False  # LPA's recipe: the teacher's KD also while finetuning (never the div head)
    finetune_repeated_augmentation: int = 1  # LPA's recipe: 3 (its finetuning keeps the RASampler)
    # the model ablation (docs/methods/dytox.md#model-ablation): shared = one class token for every task, no expansion
    task_tokens: Literal["expand", "shared"] = "expand"
    heads: Literal["independent", "shared"] = "independent"  # shared: one classifier over all seen classes
    shared_head_growth: Literal["keep", "reset"] = "keep"  # heads=shared: copy the old weights into the wider head

    def validate(self, key: str) -> None:
        for name in ("divergence_weight", "finetune_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: expected a value >= 0, got {getattr(self, name)}")
        if self.distillation_tau <= 0:
            raise ConfigError(f"{key}.distillation_tau: expected a positive temperature, got {self.distillation_tau}")
        if self.finetune_epochs < 0 or self.repeated_augmentation < 1 or self.finetune_repeated_augmentation < 1:
            raise ConfigError(f"{key}: finetune_epochs must be >= 0 and (finetune_)repeated_augmentation >= 1")
        if self.shared_head_growth != "keep" and self.heads != "shared":
            raise ConfigError(f"{key}.shared_head_growth: '{self.shared_head_growth}' applies to one shared "
                              f"classifier; set {key}.heads=shared or leave shared_head_growth at 'keep'")


@register_method("dytox")
class DyTox(Method[DyToxOptions]):
    model: DyToxNet
    uses_memory = True

    def __init__(self, cfg, scenario, device):
        self.teacher: DyToxNet | None = None
        super().__init__(cfg, scenario, device)

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        model = MODELS.get(cfg.model.name, "model.name")
        if not (isinstance(model, type) and issubclass(model, ConViT)):
            raise ConfigError(f"model.name: {cls.name} needs the 'convit' model (a task-attention decoder), "
                              f"got '{cfg.model.name}'")

    def build_model(self) -> nn.Module:
        backbone = create_backbone(self.cfg.model, self.scenario.train.image_size, self.scenario.train.channels)
        if not isinstance(backbone, ConViT):  # check() ran on the config; this guards a hand-built one
            raise ConfigError(f"model.name: {self.name} needs the 'convit' model (a task-attention decoder), "
                              f"got '{self.cfg.model.name}'")
        o = self.opts
        return DyToxNet(backbone, task_tokens=o.task_tokens, heads=o.heads,
                            shared_head_growth=o.shared_head_growth)

    # ------------------------------------------------------------------ growth
    def begin_task(self, task):
        super().begin_task(task)
        if task.index > 0 and self.opts.distillation:
            teacher = copy.deepcopy(self.model)
            teacher.head_div = None
            self.teacher = teacher.eval().requires_grad_(False)
        self.model.add_task(task.num_classes, divergence=self.opts.divergence_weight > 0)
        self.model.to(self.device)

    def phases(self, task):
        o, t = self.opts, self.cfg.train
        phases = [Phase.from_train("train", "task+memory", t, task.index, repeats=o.repeated_augmentation,
                                   repeat_mode=o.repeated_augmentation_mode)]
        if task.index > 0 and o.finetune_epochs > 0 and self.memory.enabled:
            stored = o.finetune_order == "stored_drop_last"
            phases.append(Phase.from_train("finetune", "memory", t, task.index, epochs=o.finetune_epochs,
                                           lr=t.scaled_lr(o.finetune_lr), schedule="constant", warmup_epochs=0,
                                           shuffle=not stored, drop_last=stored or o.finetune_drop_last,
                                           repeats=o.finetune_repeated_augmentation,
                                           repeat_mode=o.repeated_augmentation_mode))
        return phases

    def setup_phase(self, phase, task):
        m = self.model
        m.requires_grad_(True)
        m.train()
        if phase.name == "finetune":
            m.encoder.requires_grad_(False)
            if m.head_div is not None:
                m.head_div.requires_grad_(False)
            if self.opts.frozen_encoder_mode == "eval":
                m.encoder.eval()
        elif task.index > 0:  # a shared token or a shared head has no old part to freeze
            for token in list(m.task_tokens)[:-1]:
                token.requires_grad_(False)
            for head in list(m.heads)[:-1]:
                head.requires_grad_(False)

    # ------------------------------------------------------------------ losses
    def loss(self, batch, phase, task):
        o, m = self.opts, self.model
        emb = m.forward_features(batch.x)
        logits = m.forward_head(emb)
        cls = classification(logits, dense_targets(batch, logits.shape[1]), o.classification)
        loss, logs = cls, {"cls": cls.detach()}
        if phase.name != "train" and not o.finetune_distillation:
            return loss, logs
        n_old = task.offset
        if self.teacher is not None:
            lam = n_old / logits.shape[1]
            with torch.no_grad():
                old = self.teacher(batch.x)
            if o.kd_samples == "memory":
                # only the memory's samples, masked rather than indexed (no host read); a batch without one
                # keeps the classification loss alone, unweighted (LPA)
                rows = batch.task < task.index
                kd = masked_distillation(logits[:, :n_old], old, rows, o.distillation_tau, o.kd_reduction)
                loss = torch.where(rows.any(), (1 - lam) * cls + lam * kd, cls)
            else:
                kd = distillation(logits[:, :n_old], old, o.distillation_tau, o.kd_reduction)
                loss = (1 - lam) * cls + lam * kd
            logs["kd"] = kd.detach()
        if phase.name == "train" and m.head_div is not None and o.divergence_weight > 0:
            div_logits = m.forward_div(emb)
            div = classification(div_logits, divergence_targets(batch, n_old, task.num_classes), o.classification)
            loss = loss + o.divergence_weight * div
            logs["div"] = div.detach()
        return loss, logs

    def logits(self, x, task=None):
        return self.model(x)

    def embed(self, x):
        """Herding features: all task embeddings concatenated (the selector L2-normalises them)."""
        return self.model.forward_features(x).flatten(1)

    # ------------------------------------------------------------------ state, accounting
    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict() if self.teacher is not None else None}

    def load_extra_state(self, state: dict) -> None:
        if state.get("teacher") is not None and self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])

    def inference_modules(self) -> nn.Module:
        return self.model.inference_modules()


@register_method("dytox-plus")
class DyToxPlus(DyTox):
    """DyTox+: DyTox trained on MixUp batches (alpha 0.8, label smoothing 0.1, set in data.augment)."""

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        a = cfg.data.augment
        if a.mixup_alpha <= 0 and a.cutmix_alpha <= 0:
            raise ConfigError("data.augment.mixup_alpha: dytox-plus is DyTox with MixUp; set mixup_alpha "
                              "(0.8 in the paper) and label_smoothing (0.1), or use method.name=dytox")
