"""Replay: fine-tuning on the task's data mixed with a rehearsal memory (random or herding selection)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import MethodOptions, register_method
from .finetune import Finetune


@dataclass
class ReplayOptions(MethodOptions):
    name: str = "replay"


@register_method("replay")
class Replay(Finetune):
    Options = ReplayOptions
    uses_memory = True
