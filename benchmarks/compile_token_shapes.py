"""DyTox's compiled decoder as the task tokens grow: the token count marked dynamic (what `run.compile` does) against
padding it to power-of-two buckets, static per bucket (2, 4, 8, ... tokens; the padded tokens are zeros and their
outputs are dropped: a task token attends only to itself and the patches, so they change nothing).

    PYTHONPATH=src python benchmarks/compile_token_shapes.py [--preset dytox/cifar100-b0inc2]
        [--tasks 1,2,3,5,9,10,17,33,50] [--batch 32] [--steps 3] [--warmup 2] [--precision fp32] [--write]
        [key=value ...]

Each design runs in its own process (fresh compile caches) through `vitcl bench`'s measurement (vitcl/bench.py:
a whole training step of the task, teacher and divergence head included, then inference), one task count after
the other as a run meets them, so a graph compiled for an earlier count is reused where it fits. A row gives the
graphs compiled so far (dynamo's unique_graphs), the seconds of that count's measurement (compilation of what is
new included, its steps and the untimed filling of the memory besides; each process starts with an empty inductor
cache), and the steady rates.
`--write` puts the table in BENCHMARKS.md under "DyTox's compiled decoder: dynamic token count or buckets".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, update_section  # noqa: E402

DESIGNS = ("dynamic", "buckets")


def padded_forward_features(self, x):
    """DyToxNet.forward_features with the token count padded to the next power of two and marked static."""
    import torch
    import torch._dynamo

    tokens = self.tokens()
    t = tokens.shape[1]
    if t == 1:
        return self.decoder(tokens, self.encoder(x))
    size = 1 << (t - 1).bit_length()
    tokens = torch.cat([tokens, tokens.new_zeros(1, size - t, tokens.shape[2])], dim=1)
    torch._dynamo.mark_static(tokens, 1)
    return self.decoder(tokens, self.encoder(x))[:, :t]


def worker(design: str, preset: str, tasks: list[int], precision: str, batch: int, steps: int, warmup: int,
           overrides: list[str]) -> None:
    """One design, every task count in turn; a JSON line per count on stdout."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from vitcl.bench import bench_config, bench_device, measure
    from vitcl.models import dytox

    if design == "buckets":
        dytox.DyToxNet.forward_features = padded_forward_features  # type: ignore[method-assign]
        # a graph per bucket and kind of call (training, frozen encoder, teacher, evaluation): past dynamo's 8
        torch._dynamo.config.recompile_limit = 64
    cfg, scenario = bench_config([preset], overrides, max(tasks))
    device = bench_device(cfg)
    counters.clear()
    for n in tasks:
        t0 = time.perf_counter()
        row = measure(cfg, scenario, n, precision, True, batch, steps, warmup, device)
        print(json.dumps({"design": design, "tasks": n, "graphs": int(counters["stats"]["unique_graphs"]),
                          "seconds": time.perf_counter() - t0, "train": row.train_images_per_s,
                          "infer": row.infer_images_per_s, "peak_mb": row.peak_mb}), flush=True)


def table(rows: list[dict], tasks: list[int]) -> str:
    by = {(r["design"], r["tasks"]): r for r in rows}
    lines = ["| tasks | tokens (buckets) | graphs so far: dynamic / buckets | seconds of the count: dynamic / buckets "
             "| train img/s: dynamic / buckets | inference img/s: dynamic / buckets |", "|---|---|---|---|---|---|"]
    for n in tasks:
        d, b = by.get(("dynamic", n)), by.get(("buckets", n))
        if d is None or b is None:
            continue
        padded = 1 if n == 1 else 1 << (n - 1).bit_length()
        cells = [" / ".join(fmt.format(r[key]) if r[key] is not None else "-" for r in (d, b))
                 for key, fmt in (("graphs", "{}"), ("seconds", "{:.0f}"), ("train", "{:,.0f}"), ("infer", "{:,.0f}"))]
        lines.append(f"| {n} | {padded} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="dytox/cifar100-b0inc2")
    ap.add_argument("--tasks", default="1,2,3,5,9,10,17,33,50")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--designs", default=",".join(DESIGNS))
    ap.add_argument("--worker", choices=DESIGNS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--write", action="store_true")
    args, overrides = ap.parse_known_args()
    tasks = [int(t) for t in args.tasks.split(",")]
    if args.worker:
        worker(args.worker, args.preset, tasks, args.precision, args.batch, args.steps, args.warmup, overrides)
        return
    rows = []
    for design in args.designs.split(","):
        if design not in DESIGNS:
            raise SystemExit(f"--designs: expected a list from {', '.join(DESIGNS)}, got '{design}'")
        cmd = [sys.executable, __file__, "--worker", design, *sys.argv[1:]]
        with tempfile.TemporaryDirectory() as cache:  # inductor's on-disk caches would hide the compile times
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                    env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
            for line in proc.stdout or []:
                if line.startswith("{"):
                    rows.append(json.loads(line))
                    print(line.strip(), flush=True)
            if proc.wait():
                raise SystemExit(f"the {design} worker failed (exit {proc.returncode})")
    extra = f" {' '.join(overrides)}" if overrides else ""
    body = (f"`python benchmarks/compile_token_shapes.py --preset {args.preset} --tasks {args.tasks} --batch "
            f"{args.batch} --steps {args.steps} --warmup {args.warmup} --precision {args.precision}{extra}` on "
            f"{machine()}; compiled with inductor, random 32x32 images.\n\n{table(rows, tasks)}")
    print("\n" + body)
    if args.write:
        update_section("DyTox's compiled decoder: dynamic token count or buckets", body)


if __name__ == "__main__":
    main()
