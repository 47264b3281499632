"""Data: sources (formats on disk), image sets, scenarios, batched augmentation, rehearsal memory."""
from .dataset import ImageSet
from .scenario import Scenario, Task

__all__ = ["ImageSet", "Scenario", "Task"]
