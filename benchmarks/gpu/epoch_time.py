"""One real epoch of CIFAR-shaped data: DyTox's CIFAR-100 preset trained for a few epochs on one task of all 100
classes (50,000 training images), through everything a real run does (the CIFAR reader, the loader, crop, flip
and timm's RandAugment per image, DeiT's repeated augmentation, the trainer's step), once as published (fp32) and
once with `overlays/fast` (bf16, compiled, TF32). The figures are the trainer's own per-epoch seconds
(steps.csv): the first epoch holds the compilation, the last is the steady state. `vitcl bench` times a step on
one fixed batch; the gap between the two is what data and augmentation cost.

    python benchmarks/gpu/epoch_time.py [--data-root DIR] [--images 50000] [--epochs 2] [--write] [key=value ...]

Without --data-root it writes random pixels in CIFAR-100's own pickle format (`--images` training images,
balanced over the 100 classes, and a fifth as many test images) to a temporary folder: the reader and every
augmentation do their real work on them. `--write` puts the table in BENCHMARKS.md under
"One epoch of CIFAR-shaped data on <device>".
"""
from __future__ import annotations

import argparse
import csv
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import device_name, machine, update_section  # noqa: E402

import vitcl  # noqa: E402

PRESET = "dytox/cifar100-b0inc10"
VARIANTS = {"published": [], "overlays/fast": ["overlays/fast"]}  # presets stacked on PRESET


def write_random_cifar100(folder: Path, n_train: int, seed: int = 0) -> Path:
    """folder/cifar-100-python/{train,test,meta} as the official archive holds them, with random pixels."""
    rng = np.random.default_rng(seed)
    base = folder / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", max(n_train // 5, 100))):
        fine = rng.permutation(np.arange(n) % 100).tolist()
        rows = {"filenames": [f"{i}.png" for i in range(n)], "batch_label": name, "fine_labels": fine,
                "coarse_labels": [c // 5 for c in fine], "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        with open(base / name, "wb") as f:
            pickle.dump(rows, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{c}" for c in range(100)],
                     "coarse_label_names": [f"super{c}" for c in range(20)]}, f)
    return folder


def time_epochs(sources: list[str], data_root: Path, out: Path, name: str, epochs: int,
                overrides: list[str]) -> dict:
    """Train one task of all 100 classes for `epochs` epochs; the trainer's per-epoch and per-task figures."""
    run = vitcl.run(sources, [f"data.root={data_root}", "data.initial_increment=0", "data.increment=100",
                              f"train.epochs={epochs}", "train.warmup_epochs=0", "run.loggers=[jsonl,csv]",
                              *overrides], out_dir=out, name=name, progress=True)
    with open(run.path / "steps.csv", newline="") as f:
        steps = list(csv.DictReader(f))
    end = next(r for r in run.metrics if r["kind"] == "task_end")
    return {"epoch_seconds": [float(r["seconds"]) for r in steps],
            "images_per_s": [float(r["images_per_s"]) for r in steps],
            "task_seconds": end["seconds"], "images": end["images"], "peak_mb": end["peak_memory_bytes"] / 2**20,
            "precision": run.config.run.precision, "compile": run.config.run.compile}


def table(rows: dict[str, dict], epochs: int) -> str:
    out = [f"| run | precision | compile | images per epoch | first epoch s | last (epoch {epochs}) s | "
           "last epoch img/s | task s (training, memory, evaluation) | peak MB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        per_epoch = r["images"] // max(len(r["epoch_seconds"]), 1)
        out.append(f"| {label} | {r['precision']} | {'on' if r['compile'] else 'off'} | {per_epoch:,} | "
                   f"{r['epoch_seconds'][0]:.1f} | {r['epoch_seconds'][-1]:.1f} | {r['images_per_s'][-1]:,.0f} | "
                   f"{r['task_seconds']:.1f} | {r['peak_mb']:,.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=None, help="folder holding cifar-100-python/ (real data)")
    ap.add_argument("--images", type=int, default=50000, help="training images to generate without --data-root")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--write", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    chosen = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="vitcl-epoch-") as tmp:
        data_root = args.data_root or write_random_cifar100(Path(tmp) / "data", args.images)
        out = args.out or Path(tmp) / "runs"
        rows = {label: time_epochs([PRESET, *VARIANTS[label]], data_root, out, f"run{i}", args.epochs, overrides)
                for i, label in enumerate(chosen)}
    what = "CIFAR-100" if args.data_root else f"random pixels in CIFAR-100's format ({args.images:,} images)"
    body = (f"`python benchmarks/gpu/epoch_time.py --epochs {args.epochs}"
            f"{' ' + ' '.join(overrides) if overrides else ''}`: `{PRESET}` on one task of its 100 classes, "
            f"{what}, on {machine()}. The first epoch includes compilation; the task's seconds add herding the memory "
            f"from the task's images and the evaluation on the test set.\n\n{table(rows, args.epochs)}")
    print("\n" + body)
    if args.write:
        update_section(f"One epoch of CIFAR-shaped data on {device_name()}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
