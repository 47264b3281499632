"""LPA's "baseline" (Zheng et al., ICME 2023; `bwnzheng/LPA_ICME2023` continual/raw.py, configs/model/cifar_raw.yaml;
docs/methods/lpa.md#the-baseline): DyTox without its dynamic part. "w/LPA" is the same method with
`model.sab: lpsa` (the locality-preserving attention in the self-attention blocks), not a method of its own.

- Network: DyTox's ConViT encoder and class-attention decoder with a **single** class token (no task tokens);
  one classifier per task (LayerNorm + Linear over its classes), all on the class token's embedding.
- Loss: BCE (on MixUp's soft targets when mixing is on), plus DyTox's auto-KD with lambda = n_old / n_seen, the KL
  over the old classes' logits on the **memory samples only** (old-task samples of the batch; a batch without any
  is trained on the classification loss alone), with the published element-wise mean. No divergence head.
- Per task: the old classifiers are frozen; the class token, encoder and decoder are trained on task + memory.
- Finetuning (tasks >= 2) on the balanced memory, **with** the distillation (LPA passes its teacher there too):
  the encoder and the decoder are frozen (`freeze_ft: [sab, tab]`), so the class token and all the classifiers
  train, at a constant lr, reshuffled with repeated augmentation every epoch.
Everything else (teacher, herding on the embedding, phases, repeated augmentation, checkpoints) is DyTox's code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from .base import register_method
from .dytox import DyTox, DyToxOptions


@dataclass
class LPABaselineOptions(DyToxOptions):
    """Defaults: LPA's published options (docs/methods/lpa.md#the-baseline)."""

    divergence_weight: float = 0.0  # no divergence head (one token: nothing to diverge)
    kd_samples: Literal["all", "memory"] = "memory"
    finetune_distillation: bool = True
    repeated_augmentation: int = 3  # DeiT's RASampler, in training and in finetuning
    finetune_repeated_augmentation: int = 3
    # what finetuning freezes: LPA's `freeze_ft: [sab, tab]` (encoder+decoder) or DyTox's `[sab]` (encoder)
    finetune_frozen: Literal["encoder", "encoder+decoder"] = "encoder+decoder"
    task_tokens: Literal["expand", "shared"] = "shared"  # the one class token: DyToxNet without token expansion

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.divergence_weight:
            raise ConfigError(f"{key}.divergence_weight: lpa-baseline has a single class token and no divergence "
                              f"head; use method.name=dytox for task tokens and the divergence loss")
        if self.task_tokens != "shared" or self.heads != "independent":
            raise ConfigError(f"{key}: lpa-baseline is one shared class token with one classifier per task "
                              f"(task_tokens: shared, heads: independent); use method.name=dytox for the others")


@register_method("lpa-baseline")
class LPABaseline(DyTox):
    Options = LPABaselineOptions
    opts: LPABaselineOptions

    def setup_phase(self, phase, task):
        super().setup_phase(phase, task)
        if phase.name == "finetune" and self.opts.finetune_frozen == "encoder+decoder":
            self.model.decoder.requires_grad_(False)
            if self.opts.frozen_encoder_mode == "eval":
                self.model.decoder.eval()
