"""RKR, Rectification-based Knowledge Retention (Singh et al., CVPR 2021): a frozen pretrained network; each task
learns, in every wrapped layer, a rank-K weight rectification W + LM_t·RM_t (K = 2, factors kaiming-uniform x 0.1)
and a scale per output channel F_t (ones, after the layer: before BatchNorm in a CNN, after q, k, v, out, fc1
(before GELU) and fc2 in a ViT), plus its own head. docs/methods/taskil.md#rkr; per task 51,818 (ResNet-18) and 414,720
(ViT-B/16) parameters at K = 2."""
from __future__ import annotations

from dataclasses import dataclass

from ..models.surgery import TaskParams
from .base import register_method
from .taskil import SurgeryMethod, SurgeryOptions


@dataclass
class RKROptions(SurgeryOptions):
    rank: int = 2  # K
    scale: float = 0.1  # rkr_scale: LM, RM = kaiming-uniform x scale
    sfg: bool = True  # the scaling factor generator; false: RG only (the code's RKRwoSFG)
    rg: bool = True  # the rectification generator; false: SFG only (RKRwoRG)

    def validate(self, key: str) -> None:
        from ..errors import ConfigError

        if self.rg and self.rank < 1:
            raise ConfigError(f"{key}.rank: expected a rank >= 1, got {self.rank}")
        if not (self.rg or self.sfg):
            raise ConfigError(f"{key}: RKR without RG and SFG learns nothing but heads; use multi-head")


@register_method("rkr")
class RKR(SurgeryMethod[RKROptions]):

    def task_params(self) -> TaskParams:
        o = self.opts
        return TaskParams(rank=o.rank if o.rg else 0, sfg=o.sfg, scale=o.scale)
