"""The Python API, for notebooks and scripts: the same runs and run folders as the command line.

    import vitcl
    run = vitcl.run(["dytox/digits-b0inc2"], overrides={"train.epochs": 2})
    run.results["class_il"]["avg_incremental"], run.matrix("class_il")
    net = run.model(task=2)                       # the method after task 3, from checkpoints/task_2.pt
    print(vitcl.report([run.path]).to_markdown())  # mean ± std over the runs, beside the published values
"""
from __future__ import annotations

import errno
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import VitclError

if TYPE_CHECKING:
    from .config import Config
    from .engine.trainer import Trainer

DEFAULT_PRESET = "dytox/digits-b0inc2"  # `vitcl run` with no argument: the embedded demo (a small DyTox)


def run_folder(cfg: Config, sources: list[str]) -> Path:
    """run.out_dir / run.name, or a name made of the presets and the time when run.name is empty."""
    name = cfg.run.name
    if not name:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(Path(s).stem if s.endswith(".yaml") else s
                                                         for s in sources)).strip("-")
        name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.run.out_dir) / name


def make_run_folder(run_dir: Path) -> None:
    """The run folder, or a one-line error naming the folder that stands in the way (a file, read-only)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        where = next((p for p in run_dir.parents if p.exists()), run_dir.parent)
        reason = "a file, not a folder" if not where.is_dir() else _os_reason(where, exc)
        raise VitclError(f"{where}: cannot make the run folder {run_dir.name} there ({reason}); "
                         f"choose another run.out_dir or run.name") from None
    if not os.access(run_dir, os.W_OK):
        reason = _os_reason(run_dir, PermissionError(errno.EACCES, "permission denied"))
        raise VitclError(f"{run_dir}: the run folder is not writable ({reason}); choose another run.out_dir")


def _os_reason(folder: Path, exc: OSError) -> str:
    try:
        if exc.errno == errno.EROFS or os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return (exc.strerror or str(exc)).lower()


def prepare_run(sources: list[str], overrides: list[str], progress: bool = True, announce: bool = True) -> Trainer:
    """A new run's trainer, its folder made and its config and data record written (what `vitcl run` does before
    training); `announce` prints the run folder and what runs where (on stderr), `progress` the progress line."""
    from .data import distributed as dist
    from .engine.trainer import Trainer
    from .eval import jsonfile
    from .runconfig import load_config, save_run_config

    cfg, _ = load_config(sources, overrides)
    run_dir = run_folder(cfg, sources)
    run_dir = Path(dist.broadcast_object(str(run_dir))) if dist.world_size() > 1 else run_dir
    if (run_dir / "checkpoints" / "last.pt").exists():
        raise VitclError(f"{run_dir}: a run already lives there; `vitcl resume {run_dir}` continues it, "
                         f"or choose another run.name")
    trainer = Trainer(cfg, run_dir, progress=progress)
    run_dir = trainer.run_dir
    if dist.is_main():
        make_run_folder(run_dir)
        save_run_config(run_dir, cfg, sources, overrides)
        jsonfile.write_atomic(run_dir / "data.json", {"datasets": trainer.scenario.data_record})
        if announce:
            print(f"run folder: {run_dir}", file=sys.stderr)
            data = cfg.data.datasets or cfg.data.dataset
            print(f"{cfg.method.name} · {cfg.model.name} · {data} · {trainer.scenario.describe()} · device "
                  f"{trainer.device}" + (f" × {trainer.world}" if trainer.world > 1 else ""), file=sys.stderr)
    return trainer


def _override_items(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    return list(overrides)


def run(presets: Sequence[str] | str = (DEFAULT_PRESET,), overrides: Mapping[str, Any] | Sequence[str] | None = None,
        out_dir: str | Path | None = None, name: str | None = None, progress: bool = True) -> Run:
    """Train presets (or YAML files) with overrides ({"train.epochs": 2} or ["train.epochs=2"]) into a run folder,
    as `vitcl run` does, and return it loaded back."""
    from .engine.trainer import write_results
    from .eval.plots import write_plots

    sources = [presets] if isinstance(presets, str) else list(presets)
    items = _override_items(overrides)
    items += [f"run.out_dir={out_dir}"] if out_dir is not None else []
    items += [f"run.name={name}"] if name is not None else []
    trainer = prepare_run(sources or [DEFAULT_PRESET], items, progress=progress, announce=progress)
    results = trainer.fit()
    write_results(trainer.run_dir, results)
    write_plots(results, trainer.run_dir / "plots")
    return load_run(trainer.run_dir)


class Run:
    """A run folder read back: its resolved config, metrics, results and the network after any task."""

    def __init__(self, path: Path):
        from .runconfig import load_run_config

        self.path = path
        self.spec = load_run_config(path)
        self.config = self.spec.config

    @property
    def results(self) -> dict:
        from .eval.report import load_results

        return load_results(self.path)

    @property
    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def matrix(self, setting: str = "class_il") -> list[list[float]]:
        """The accuracy matrix (row: after task i, column: task j) of "class_il" or "task_il"."""
        if setting not in ("class_il", "task_il"):
            raise ValueError(f"setting: expected 'class_il' or 'task_il', got {setting!r}")
        return self.results[setting]["acc_matrix"]

    def summary(self) -> str:
        from .eval.report import summary_table

        return summary_table(self.results)

    def model(self, task: int):
        """The method (its network in `.model`) as it was after 0-based `task`, from checkpoints/task_<task>.pt."""
        from .engine import checkpoint
        from .engine.trainer import Trainer, task_checkpoints

        paths = dict(task_checkpoints(self.path))
        if task not in paths:
            raise VitclError(f"{self.path / 'checkpoints'}: no checkpoint of task {task} (task_{task}.pt); the run "
                             f"keeps {sorted(paths) or 'none'}")
        trainer = Trainer(self.config, self.path, progress=False)
        trainer.restore(checkpoint.load(paths[task]))
        trainer.method.model.eval()
        return trainer.method

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"


def load_run(path: str | Path) -> Run:
    return Run(Path(path))


def report(paths: Sequence[str | Path]):
    """The paper table of run or sweep folders (mean ± std per preset beside the published cells): `.rows`,
    `.to_markdown()`, `.to_csv()`, `.to_latex()`, `.to_json()`."""
    from .sweep import report as sweep_report

    return sweep_report(list(paths))
