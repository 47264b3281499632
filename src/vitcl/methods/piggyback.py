"""Piggyback (Mallya et al., ECCV 2018): a frozen pretrained network; each task learns a binary mask over every
wrapped weight (real scores, binarised at 5e-3 with a straight-through gradient, initialised at 1e-2 so the mask
starts all ones) and its own head. BatchNorm is frozen. Recipe: Adam 1e-4 for masks and head, 30 epochs, x0.1 at
epoch 15, batch 32 (presets `piggyback/*`). Each mask costs 1/32 of the weights it covers.
docs/methods/taskil.md#piggyback."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..models.surgery import TaskParams
from .base import register_method
from .taskil import SurgeryMethod, SurgeryOptions


@dataclass
class PiggybackOptions(SurgeryOptions):
    bn: Literal["task", "shared", "frozen"] = "frozen"
    mask_init: float = 1e-2
    threshold: float = 5e-3


@register_method("piggyback")
class Piggyback(SurgeryMethod[PiggybackOptions]):

    def task_params(self) -> TaskParams:
        return TaskParams(weight_mask=True, mask_init=self.opts.mask_init, threshold=self.opts.threshold)
