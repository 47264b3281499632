"""Task-IL methods on an offline sequence, on CPU: single, multi-head (frozen and fine-tuned in turn), piggyback,
rkr, mask-rkr.

A small backbone is first trained on scikit-learn's digits (all 10 classes, 32x32: the "pretrained" network the
methods start from, saved and then loaded through model.pretrained), then every method learns split
Fashion-MNIST, 5 tasks of 2 classes in a seeded class order, task-incremental. Every method gets the same data and
the same short recipe (Adam 1e-3, cosine, no weight decay); each task is evaluated with its own parameters and
head at the end of every task, and every 2 epochs during its own training (for the public code's protocol).

    PYTHONPATH=src python benchmarks/taskil_offline.py --backbone resnet --out runs/bench-taskil

Writes a Markdown table to stdout and OUT/table-<backbone>.md. Needs Fashion-MNIST's IDX files in
/usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist); until the IDX reader is part of the package,
this script reads them itself.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vitcl.cli import main  # noqa: E402

BACKBONES = {
    # ResNet-18 layout at width 8 (176k parameters), CIFAR stem
    "resnet": ["model.name=resnet18", "model.width=8", "model.stem=cifar"],
    # a small ViT: dim 64, 4 blocks of 4 heads, MLP x2, patch 4 (64 tokens at 32 px), mean pooling
    "vit": ["model.name=vit", "model.patch_size=4", "model.embed_dim=64", "model.depth=4", "model.num_heads=4",
            "model.mlp_ratio=2.0", "model.pool=mean"],
}
METHODS = [  # (label, method, overrides after the common recipe)
    ("single", "single", []),
    ("multi-head", "multi-head", []),
    ("multi-head (every-task)", "multi-head", ["method.backbone=every-task"]),
    ("piggyback", "piggyback", []),
    ("piggyback (lr 1e-4)", "piggyback", ["train.lr=1e-4"]),
    ("rkr", "rkr", []),
    ("rkr (bn shared)", "rkr", ["method.bn=shared"]),  # the reference code's BatchNorm, as the table presets
    ("mask-rkr", "mask-rkr", []),
    ("mask-rkr (bn shared)", "mask-rkr", ["method.bn=shared"]),
    ("mask-rkr (mask-product)", "mask-rkr", ["method.rg=mask-product"]),
]
RECIPE = ["train.optimizer=adam", "train.lr=1e-3", "train.weight_decay=0.0", "train.schedule=cosine",
          "train.min_lr=0.0", "train.warmup_epochs=0", "train.batch_size=32", "run.threads=1", "run.progress=false"]


def ensure_fashion_mnist() -> None:
    """Read Fashion-MNIST's IDX files here if the package only knows the dataset's shape."""
    from vitcl.data.dataset import ImageSet
    from vitcl.data.sources import SOURCES
    from vitcl.data.sources.catalog import ShapeOnly

    cls = SOURCES.get("fashion-mnist")
    if not issubclass(cls, ShapeOnly):
        return

    def read(path: Path, offset: int) -> np.ndarray:
        with gzip.open(path, "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    class LocalFashionMNIST(cls):
        def locate(self, root):
            return Path("/usr/share/datasets/fashion-mnist")

        def load(self, root, train, download=False):
            d, split = self.locate(root), "train" if train else "t10k"
            x = read(d / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
            y = read(d / f"{split}-labels-idx1-ubyte.gz", 8).astype(np.int64)
            return ImageSet(torch.from_numpy(y), torch.from_numpy(x.copy()), class_names=[str(i) for i in range(10)])

    SOURCES._items["fashion-mnist"] = LocalFashionMNIST


def pretrain(backbone: str, out: Path, epochs: int) -> Path:
    """Train the backbone on digits (10 classes at once) and save its state dict."""
    path = out / f"pretrained-{backbone}.pth"
    if path.exists():
        return path
    from vitcl.engine.trainer import Trainer
    from vitcl.runconfig import load_config

    cfg, _ = load_config(["finetune/digits-b0inc2"], [
        *BACKBONES[backbone], "data.image_size=32", "data.initial_increment=10", "data.class_order=null",
        "data.augment.crop_padding=2", *RECIPE, f"train.epochs={epochs}", f"run.out_dir={out}",
        f"run.name=pretrain-{backbone}"])
    trainer = Trainer(cfg, out / f"pretrain-{backbone}", progress=False)
    (out / f"pretrain-{backbone}").mkdir(parents=True, exist_ok=True)
    res = trainer.fit()
    torch.save(trainer.method.model.backbone.state_dict(), path)
    print(f"pretrained {backbone} on digits: {res['class_il']['last']:.1f}% test accuracy", file=sys.stderr)
    return path


def run(label: str, method: str, extra: list[str], backbone: str, weights: Path, out: Path, args) -> dict:
    name = f"{backbone}-{method}" + "".join("-" + e.split("=")[1] for e in extra)
    if not (out / name / "results.json").exists() or args.fresh:
        rc = main(["run", "data/fashion-mnist-b0inc2", "finetune/digits-b0inc2",
                   "data.dataset=fashion-mnist", "data.setting=task-il", "data.class_order=random",
                   "data.class_order_seed=1993", "data.increment=2", "data.image_size=32", "data.resize=resize",
                   "data.augment.hflip=false", "data.augment.crop_padding=2",
                   f"data.train_per_class={args.train_per_class}", f"data.test_per_class={args.test_per_class}",
                   *BACKBONES[backbone], f"model.pretrained={weights}", f"method.name={method}",
                   *RECIPE, f"train.epochs={args.epochs}", "train.eval_every=2", *extra,
                   f"run.out_dir={out}", f"run.name={name}", "-q"])
        if rc:
            raise SystemExit(f"{name}: vitcl run failed ({rc})")
    res = json.loads((out / name / "results.json").read_text())
    res["label"] = label
    return res


def row(res: dict, reference: float) -> str:
    til, tasks = res["task_il"], res["tasks"]
    T = len(tasks)
    final = til["acc_matrix"][-1]
    added = (tasks[-1]["params"] - tasks[0]["params"]) / max(T - 1, 1)
    secs = sum(t["seconds"] for t in tasks)
    total = tasks[-1]["params"]
    return (f"| {res['label']} | {sum(final) / T:.2f} | {til['avg_incremental']:.2f} | {til['forgetting']:.2f} "
            f"| {til['avg_best_during_training']:.2f} | {total:,.0f} | {100 * (total / reference - 1):+.1f}% "
            f"| {tasks[0]['params'] - reference:,.0f} | {added:,.0f} | {secs:.0f} |")


def main_bench() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="resnet")
    p.add_argument("--out", default="runs/bench-taskil")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=300)
    p.add_argument("--fresh", action="store_true", help="rerun methods whose results exist")
    p.add_argument("--methods", nargs="*", help="only these methods (names as in the table's first column)")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_fashion_mnist()
    t0 = time.perf_counter()
    weights = pretrain(args.backbone, out, args.pretrain_epochs)
    chosen = [row for row in METHODS if not args.methods or row[0] in args.methods]
    results = [run(label, m, extra, args.backbone, weights, out, args) for label, m, extra in chosen]
    from vitcl.data.build import build_scenario
    from vitcl.methods import METHODS as REG
    from vitcl.runconfig import load_config

    cfg, _ = load_config(["finetune/digits-b0inc2"], [*BACKBONES[args.backbone], "data.image_size=32",
                                                       "method.name=multi-head", "data.setting=task-il"])
    reference = REG.get("multi-head")(cfg, build_scenario(cfg.data, shapes_only=True), torch.device("cpu")).reference
    lines = ["| method | task-IL acc, final | avg incremental | forgetting | best while training* | #P after 5 tasks "
             "| vs 1 backbone+head | added by task 1 | added per later task | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(r, reference) for r in results]
    table = "\n".join(lines)
    (out / f"table-{args.backbone}.md").write_text(table + "\n")
    print(table)
    print(f"\nreference (one backbone + one 2-class head): {reference:,.0f} parameters; "
          f"wall time {time.perf_counter() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main_bench()
