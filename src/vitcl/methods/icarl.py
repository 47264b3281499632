"""iCaRL (Rebuffi et al., CVPR 2017): herding memory, distillation towards the previous model, and
classification by the nearest mean of exemplars, reported beside the network head's (docs/methods/icarl.md).

Per task t: the frozen copy of the model taken before the new head is added is the teacher (t >= 1); the phase
trains on the task's data + the memory with
    distillation 'bce' (the paper's):  BCE(sigmoid(logits), [sigmoid(teacher's old logits), one-hot new classes])
                                        averaged over B x C (`losses.icarl_bce`);
    distillation 'kd' (PyCIL's icarl.py): CE(logits, y) + KD_T(old-class logits, teacher's), T = 2
                                        (`losses.soft_distillation`);
then herding picks the exemplars (memory.selection: herding), and the class means of the exemplars (unit-norm
features, averaged with the flipped image) are recomputed for every seen class (`nme.NMEScorer`).
Evaluation scores with both classifiers in one pass: `classifier` names the main one (nme: the paper's), the
other is the extra scorer ("cnn" or "nme") in the results.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from .base import MethodOptions, register_method
from .distilled import WithTeacher
from .losses import classification_loss, icarl_bce, soft_distillation
from .nme import NMEScorer


@dataclass
class ICaRLOptions(MethodOptions):
    distillation: Literal["bce", "kd"] = "bce"  # bce: the paper's; kd: PyCIL's softmax KD at `temperature`
    temperature: float = 2.0  # the kd distillation's T
    kd_weight: float = 1.0  # the kd distillation's weight (PyCIL: 1)
    classifier: Literal["nme", "cnn"] = "nme"  # the main evaluation scores; the other one is reported as extra
    flip_means: bool = True  # class means over each exemplar and its horizontal flip (the authors' code)

    def validate(self, key: str) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{key}.temperature: expected a positive temperature, got {self.temperature}")
        if self.kd_weight < 0:
            raise ConfigError(f"{key}.kd_weight: expected a weight >= 0, got {self.kd_weight}")


@register_method("icarl")
class ICaRL(WithTeacher):
    Options = ICaRLOptions
    opts: ICaRLOptions
    uses_memory = True
    settings = frozenset({"class-il"})

    def __init__(self, cfg, scenario, device):
        self.nme = NMEScorer()
        super().__init__(cfg, scenario, device)

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if not (cfg.memory.size or cfg.memory.per_class):
            raise ConfigError("memory.size: icarl classifies by the means of its exemplars; give a memory "
                              "(2000 in the DyTox tables)")
        a = cfg.data.augment
        if cfg.method.distillation == "bce" and (a.mixup_alpha > 0 or a.cutmix_alpha > 0):
            raise ConfigError("data.augment.mixup_alpha: icarl's bce distillation takes hard labels; turn MixUp/"
                              "CutMix off or use method.distillation=kd")

    def loss(self, batch, phase, task):
        logits = self.model(batch.x)
        old = None
        if self.teacher is not None:
            with torch.no_grad():
                old = self.teacher(batch.x)
        if self.opts.distillation == "bce":
            loss = icarl_bce(logits, batch.y, old)
            return loss, {"bce": loss.detach()}
        ce = classification_loss(logits, batch)
        if old is None:
            return ce, {"ce": ce.detach()}
        kd = soft_distillation(logits[:, : task.offset], old, self.opts.temperature)
        return ce + self.opts.kd_weight * kd, {"ce": ce.detach(), "kd": kd.detach()}

    def consolidate(self, task, ctx):
        rows = self.memory.indices()
        self.nme.update(ctx, rows, self.scenario.train_labels[rows], self.embed, self.seen, self.opts.flip_means)

    # ------------------------------------------------------------------ evaluation
    def extra_scorers(self) -> tuple[str, ...]:
        return ("cnn",) if self.opts.classifier == "nme" else ("nme",)

    def scores(self, x):
        feats = self.model.backbone(x)
        scores = {"cnn": self.model.head(feats), "nme": self.nme(feats, self.seen)}
        main = self.opts.classifier
        return scores.pop(main), scores

    def extra_state(self) -> dict:
        return {**super().extra_state(), "nme": self.nme.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.nme.load_state_dict(state.get("nme", {}), self.device)
