"""The engine: the one training loop, data streaming, optimisers and schedules, checkpoints, DDP."""
