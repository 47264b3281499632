"""Throughput of the training augmentation: timm's per-image RandAugment against kornia's batch-level one.

BatchAugment.train on uint8 batches of 128x3x32x32 (crop with padding 4, flip) and 128x3x224x224 (flip), on one
torch thread: without RandAugment, with `rand-m9-mstd0.5-inc1` (bicubic, as DyTox's presets) and with kornia's
RandAugment(n=2, m=27) (the presets' former setting). Rounds run every configuration once, in a shuffled order, so
that a busy machine slows them alike; throughput is over all rounds (kornia's cost depends on the 2 operations each
batch draws, so its median over a few rounds would be the cost of a few draws), and the ratio of the per-image to
the batch-level pipeline is taken within this one run. Writes the "RandAugment throughput" section of BENCHMARKS.md.

    PYTHONPATH=src python benchmarks/randaugment_throughput.py [--rounds 30] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch
from report import machine, update_section

from vitcl.config import AugmentConfig
from vitcl.data.augment import BatchAugment

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
PIPELINES = {
    "none": {},
    "timm per-image": {"randaugment": "rand-m9-mstd0.5-inc1", "randaugment_interpolation": "bicubic"},
    "kornia batch": {"randaugment_n": 2, "randaugment_m": 27},
}
SHAPES = {32: {"crop_padding": 4, "hflip": True}, 224: {"hflip": True}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    augs = {(size, name): BatchAugment(AugmentConfig(**SHAPES[size], **kw), MEAN, STD, channels=3)
            for size in SHAPES for name, kw in PIPELINES.items()}
    batches = {size: torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8) for size in SHAPES}
    for (size, _), aug in augs.items():  # warm-up
        aug.train(batches[size])
    times: dict[tuple[int, str], list[float]] = {k: [] for k in augs}
    keys = list(augs)
    order = random.Random(0)
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        order.shuffle(keys)
        for key in keys:
            t0 = time.process_time()
            out = augs[key].train(batches[key[0]])
            times[key].append(time.process_time() - t0)
            assert out.shape == batches[key[0]].shape
    med = {k: sum(v) / len(v) for k, v in times.items()}  # mean time per batch
    rows = ["| batch | no RandAugment (img/s) | timm per-image (img/s) | kornia batch (img/s) | per-image / batch time |",
            "|---|---|---|---|---|"]
    for size in SHAPES:
        ips = {name: args.batch / med[(size, name)] for name in PIPELINES}
        ratio = med[(size, "timm per-image")] / med[(size, "kornia batch")]
        rows.append(f"| {args.batch}x3x{size}x{size} | {ips['none']:.0f} | {ips['timm per-image']:.0f} | "
                    f"{ips['kornia batch']:.0f} | {ratio:.2f} |")
    body = f"""`benchmarks/randaugment_throughput.py`: images/s of `BatchAugment.train` (uint8 in, normalised float out) on
one torch thread, CPU time of the process over {args.rounds} rounds that run every configuration once in a shuffled
order. 32x32: crop (padding 4) and flip first; 224x224: flip first. timm per-image:
`rand-m9-mstd0.5-inc1`, bicubic, each image its own 2 operations, probabilities, magnitudes and signs; kornia batch:
RandAugment(n=2, m=27), the same 2 operations on the whole batch, always applied. Machine: {machine()}, load
average {load0:.1f} at the start (shared with other jobs).

{chr(10).join(rows)}
"""
    print(body)
    if not args.no_write:
        update_section("RandAugment throughput", body)


if __name__ == "__main__":
    main()
