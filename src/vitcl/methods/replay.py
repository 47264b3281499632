"""Replay: fine-tuning on the task's data mixed with a rehearsal memory (random or herding selection)."""
from __future__ import annotations

from .base import register_method
from .finetune import Finetune


@register_method("replay")
class Replay(Finetune):
    uses_memory = True
