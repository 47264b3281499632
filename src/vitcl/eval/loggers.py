"""Where a run's metrics go besides metrics.jsonl (always written): `run.loggers: [tensorboard, wandb, csv]`.

The trainer hands every logger the same things at the same points, so none adds a host read to a training step:
the epoch's scalars when an epoch ends (mean loss, lr, images/s: already read for the progress line), every
evaluation record (those of metrics.jsonl), the accuracy matrices after each task, and the resolved config once.
A step is keyed by (task, phase, epoch), written as the integer task * 10000 + phase * 100 + epoch, so that on
resume a logger drops what the killed process wrote after its last checkpoint (TensorBoard's purge_step, the CSV
rows) instead of duplicating it. Each optional logger's package is checked when the trainer is built: a missing
one is a one-line error naming the extra to install.
"""
from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

from ..errors import ConfigError

EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # logger: (module, extra)
EVAL_COLUMNS = ("step", "kind", "task", "phase", "epoch", "seen_class_il", "seen_task_il", "seen_class_il_topk",
                "params", "seconds", "images_per_s", "peak_memory_bytes")
STEP_COLUMNS = ("step", "task", "phase", "epoch", "loss", "lr", "seconds", "images_per_s")  # of the epoch alone


def step_key(task: int, phase: int, epoch: int) -> int:
    return task * 10000 + phase * 100 + epoch


def check_available(names: list[str]) -> None:
    for name in names:
        if name in EXTRAS and importlib.util.find_spec(EXTRAS[name][0]) is None:
            raise ConfigError(f"run.loggers: '{name}' needs the {EXTRAS[name][0]} package: "
                              f"pip install 'vitcl[{EXTRAS[name][1]}]'")


def matrix_png(rows: list[list[float]], title: str) -> bytes:
    from .plots import _pyplot

    plt = _pyplot()
    T = len(rows)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * T, 1.0 + 0.5 * T))
    square = [r + [float("nan")] * (T - len(r)) for r in rows]
    ax.imshow(square, vmin=0, vmax=100, cmap="viridis")
    ax.set(xlabel="evaluated task", ylabel="after training task", title=title)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


class CSVLogger:
    """metrics.csv: one row per evaluation (EVAL_COLUMNS); steps.csv: one row per epoch (STEP_COLUMNS)."""

    def __init__(self, run_dir: Path, resume_key: int | None):
        self.metrics, self.steps = run_dir / "metrics.csv", run_dir / "steps.csv"
        for path, columns in ((self.metrics, EVAL_COLUMNS), (self.steps, STEP_COLUMNS)):
            keep = self._rows(path, resume_key) if resume_key is not None else []
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, columns)
                w.writeheader()
                w.writerows(keep)

    @staticmethod
    def _rows(path: Path, upto: int) -> list[dict]:
        if not path.exists():
            return []
        with open(path, newline="") as f:
            return [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) < upto]

    def _append(self, path: Path, columns, row: dict) -> None:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, columns, extrasaction="ignore").writerow(row)

    def epoch(self, step: int, scalars: dict) -> None:
        self._append(self.steps, STEP_COLUMNS, {"step": step, **scalars})

    def evaluation(self, step: int, record: dict) -> None:
        self._append(self.metrics, EVAL_COLUMNS, {**record, "step": step})

    def matrices(self, step: int, matrices: dict[str, list[list[float]]]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    def __init__(self, run_dir: Path, resume_key: int | None, config_text: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_key)
        if resume_key is None:
            self.writer.add_text("config", "```\n" + config_text + "\n```", 0)

    def epoch(self, step: int, scalars: dict) -> None:
        for name in ("loss", "lr", "images_per_s"):
            self.writer.add_scalar(f"train/{name}", scalars[name], step)

    def evaluation(self, step: int, record: dict) -> None:
        for name in ("seen_class_il", "seen_task_il", "seen_class_il_topk"):
            value = record.get(name)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"eval/{name}", value, step)

    def matrices(self, step: int, matrices: dict[str, list[list[float]]]) -> None:
        import numpy as np
        from PIL import Image

        for key, rows in matrices.items():
            image = np.asarray(Image.open(io.BytesIO(matrix_png(rows, f"{key} accuracy (%)"))).convert("RGB"))
            self.writer.add_image(f"acc_matrix/{key}", image, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, resume_key: int | None, config: dict, project: str, mode: str):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, dir=str(run_dir), config=config, mode=mode, name=run_dir.name,
                              id=run_dir.name.replace("/", "-"), resume="allow")

    def epoch(self, step: int, scalars: dict) -> None:
        self.run.log({f"train/{k}": v for k, v in scalars.items() if k in ("loss", "lr", "images_per_s")},
                     step=step)

    def evaluation(self, step: int, record: dict) -> None:
        self.run.log({f"eval/{k}": record[k] for k in ("seen_class_il", "seen_task_il")
                      if isinstance(record.get(k), (int, float))}, step=step)

    def matrices(self, step: int, matrices: dict[str, list[list[float]]]) -> None:
        for key, rows in matrices.items():
            table = self.wandb.Table(columns=[f"task {j + 1}" for j in range(len(rows))],
                                     data=[r + [None] * (len(rows) - len(r)) for r in rows])
            self.run.log({f"acc_matrix/{key}": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLoggers:
    """The loggers `run.loggers` names (jsonl is the trainer's own metrics.jsonl), for the main process."""

    def __init__(self, names: list[str], run_dir: Path, config: dict, config_text: str, resume_key: int | None,
                 wandb_project: str = "vitcl", wandb_mode: str = "offline"):
        self.loggers: list = []
        if "csv" in names:
            self.loggers.append(CSVLogger(run_dir, resume_key))
        if "tensorboard" in names:
            self.loggers.append(TensorBoardLogger(run_dir, resume_key, config_text))
        if "wandb" in names:
            self.loggers.append(WandbLogger(run_dir, resume_key, config, wandb_project, wandb_mode))

    def epoch(self, step: int, scalars: dict) -> None:
        for logger in self.loggers:
            logger.epoch(step, scalars)

    def evaluation(self, step: int, record: dict) -> None:
        for logger in self.loggers:
            logger.evaluation(step, record)

    def matrices(self, step: int, matrices: dict[str, list[list[float]]]) -> None:
        for logger in self.loggers:
            logger.matrices(step, matrices)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
