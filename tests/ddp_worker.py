"""Run under torchrun by test_distributed.py and test_ranked_memory.py: train a tiny run (replay, or the preset
given before the overrides), then save this rank's memory, its method state and its training rows of the last
task's first epoch as planned with the final memory."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from vitcl.data import distributed as dist  # noqa: E402
from vitcl.engine.trainer import Trainer  # noqa: E402
from vitcl.runconfig import load_config  # noqa: E402

out, args = Path(sys.argv[1]), sys.argv[2:]
preset = args.pop(0) if args and "=" not in args[0] else "replay/digits-b0inc2"
cfg, _ = load_config([preset], args)
(out / "run").mkdir(parents=True, exist_ok=True)
trainer = Trainer(cfg, out / "run", progress=False)
assert trainer.world == 2, trainer.world
trainer.fit()
torch.save(trainer.method.memory.state_dict(), out / f"memory_rank{trainer.rank}.pt")
torch.save(trainer.method.state_dict(), out / f"method_rank{trainer.rank}.pt")
task = trainer.scenario[len(trainer.scenario) - 1]
phase = trainer.method.phases(task)[0]
torch.save(trainer.epoch_steps(task, 0, phase, 0, trainer.rank_rows(phase, task)), out / f"plan_rank{trainer.rank}.pt")
dist.barrier()
dist.shutdown()
