"""DyTox on Fashion-MNIST with the public code's recipe (its bugs included) and with the fixes overlay, side by side.

Both rows are the small DyTox of `fmnist_dytox_compare.py` (same ConViT, data subset, memory of 200, 10 epochs per
task, batch 32, AdamW). "recipe" sets every key that `configs/overlays/dytox-fixes.yaml` changes to the value of
the reproduction presets: finetuning on the memory in stored order with its last partial batch dropped, DyTox's
herding (picks may repeat) on features under the training augmentation, the lr schedule one epoch behind
(`lr_scheduler.step(epoch)` after each epoch) and the training loader's last partial batch dropped. "fixes" stacks
the overlay after it. Everything else is equal, so the difference is the effect of the published bugs at this scale.

    PYTHONPATH=src python benchmarks/fmnist_dytox_recipe.py [--seeds 0,1] [--per-class 300] [--epochs 10]
        [--threads 1] [--out /tmp/fmnist-dytox-recipe]
"""
from __future__ import annotations

import argparse
import statistics

from fmnist_dytox_compare import METHODS, common_overrides, print_table, run

RECIPE = ["method.finetune_order=stored_drop_last", "memory.selection=dytox-herding", "memory.features_augment=true",
          "train.lr_step=timm-after-epoch", "train.drop_last=true"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--test-per-class", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/fmnist-dytox-recipe")
    args = ap.parse_args()
    common = common_overrides(args) + METHODS["dytox"] + RECIPE
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for variant, after in (("recipe", []), ("fixes", ["overlays/dytox-fixes"])):
            # overrides apply after every source: the overlay's keys go in as overrides, after the recipe's
            overrides = common + [f"run.seed={seed}"] + [f"{k}={v}" for k, v in overlay_keys(after)]
            rows.append(run(f"{variant}-seed{seed}", ["data/fashion-mnist-b0inc2"], overrides, args.out))
    print_table(rows, args)
    for variant in ("recipe", "fixes"):
        rs = [r for name, r, _ in rows if name.startswith(variant)]
        avg = statistics.mean(r["class_il"]["avg_incremental"] for r in rs)
        last = statistics.mean(r["class_il"]["last"] for r in rs)
        print(f"mean {variant}: CIL Avg {avg:.2f} / Last {last:.2f} over {len(rs)} seeds")


def overlay_keys(sources: list[str]) -> list[tuple[str, object]]:
    """The dotted keys and values of overlay presets, in order, so that they apply after the recipe overrides."""
    from vitcl.runconfig import load_source

    out: list[tuple[str, object]] = []

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out.append((f"{prefix}{k}", str(v).lower() if isinstance(v, bool) else v))

    for s in sources:
        walk(load_source(s), "")
    return out


if __name__ == "__main__":
    main()
