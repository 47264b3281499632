"""Mask-RKR (Takeda & Yanai, PRMU 2022): RKR whose later tasks learn only Piggyback masks. Task 0 learns the base
factors LM_0, RM_0, F_0 (and its head) on the frozen pretrained network; task t >= 1 learns binary masks over them,
LM_t = B(S^LM_t) ⊙ LM_0, RM_t = B(S^RM_t) ⊙ RM_0, F_t = B(S^F_t) ⊙ F_0 (B: 1[S > 5e-3], scores start at 1e-2),
plus its head: 1/32 of RKR's per-task cost. docs/methods/taskil.md#mask-rkr.

Variants of the public code (`rg`, `sfg_mode`): mask-product (PBwR: one mask over the product LM_0·RM_0),
mask-lm / mask-rm (only LM or only RM masked, the other real per task: RMnoPB / LMnoPB), real (RGnoPB: per-task
real factors); sfg_mode real (SFGnoPB), where `sfg_spare` keeps the unused shared F_0 that the public ViT and Swin
code holds beside the per-task F_t (the paper's ablation counts for ViT-B/16 and Swin include it). `rank` raised to
17 / 19 / 18 gives the Mask-RKR paper's "Ours K+" rows; the ablation rows are docs/methods/taskil.md#ablations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..models.surgery import TaskParams
from .base import register_method
from .taskil import SurgeryMethod, SurgeryOptions


@dataclass
class MaskRKROptions(SurgeryOptions):
    rank: int = 2  # K
    scale: float = 0.1
    rg: Literal["mask", "mask-product", "mask-lm", "mask-rm", "real"] = "mask"  # how tasks >= 1 get LM, RM
    sfg_mode: Literal["mask", "real"] = "mask"  # how tasks >= 1 get F
    sfg_spare: bool = False  # sfg_mode real only: also hold a shared F_0 no task uses (counted; ViT/Swin code)
    mask_init: float = 1e-2
    threshold: float = 5e-3

    def validate(self, key: str) -> None:
        from ..errors import ConfigError

        if self.rank < 1:
            raise ConfigError(f"{key}.rank: expected a rank >= 1, got {self.rank}")
        if self.sfg_spare and self.sfg_mode != "real":
            raise ConfigError(f"{key}.sfg_spare: needs {key}.sfg_mode=real (with masks the shared F_0 is in use "
                              f"already), got sfg_mode={self.sfg_mode}")


@register_method("mask-rkr")
class MaskRKR(SurgeryMethod[MaskRKROptions]):

    def task_params(self) -> TaskParams:
        o = self.opts
        return TaskParams(rank=o.rank, sfg=True, later=o.rg, sfg_later=o.sfg_mode, sfg_spare=o.sfg_spare,
                          scale=o.scale, mask_init=o.mask_init, threshold=o.threshold)
