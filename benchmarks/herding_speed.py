"""Time of herding selection (iCaRL's without replacement, and DyTox's with replacement) on random features,
with the Gram-matrix expansion of data/memory.py against the previous direct form, which built a
(classes x candidates x dims) tensor at every step. One torch thread; CPU time of the process.

    PYTHONPATH=src python benchmarks/herding_speed.py [--direct-large]

Cases: 200 of 500 per class for 10 classes with 384-d and 19,200-d features (DyTox's concatenated task
embeddings after 50 tasks), and 20 of 500 for 100 classes with 3,840-d. The direct form of the 19,200-d case runs
only with --direct-large (minutes). Each case checks the picks against the direct form in float64 (the exact
answer up to ties), and says whether the previous, float32 direct form picked the same.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from vitcl.data.memory import herding, herding_with_replacement

CASES = [(10, 500, 384, 200), (10, 500, 19_200, 200), (100, 500, 3_840, 20)]


def direct_herding(feats, valid, k):
    """The previous implementation: the distance of every candidate mean to the class mean at every step."""
    C, n, d = feats.shape
    mu = (feats * valid[..., None]).sum(1) / valid.sum(1).clamp(min=1)[:, None]
    running, available = feats.new_zeros(C, d), valid.clone()
    picks = torch.full((C, min(k, n)), -1, dtype=torch.long)
    for j in range(min(k, n)):
        dist = (mu[:, None, :] - (running[:, None, :] + feats) / (j + 1)).norm(dim=2)
        best = dist.masked_fill(~available, float("inf")).argmin(1)
        picks[:, j] = best
        running = running + feats[torch.arange(C), best]
        available[torch.arange(C), best] = False
    return list(picks)


def direct_with_replacement(feats, valid, k, max_steps=1000):
    C, n, d = feats.shape
    mu = (feats * valid[..., None]).sum(1) / valid.sum(1).clamp(min=1)[:, None]
    w, target = mu.clone(), valid.sum(1).clamp(max=k)
    first = torch.full((C, n), n + 1, dtype=torch.long)
    n_picked, arange = torch.zeros(C, dtype=torch.long), torch.arange(C)
    for _ in range(max_steps):
        active = n_picked < target
        if not bool(active.any()):
            break
        best = torch.einsum("cnd,cd->cn", feats, w).masked_fill(~valid, float("-inf")).argmax(1)
        new = active & (first[arange, best] == n + 1)
        first[arange[new], best[new]] = n_picked[new]
        n_picked = n_picked + new.long()
        w = w + torch.where(active[:, None], mu - feats[arange, best], torch.zeros_like(w))
    order = torch.sort(first, dim=1, stable=True).indices
    return [order[c, : int(target[c])] for c in range(C)]


def timed(fn, *args):
    t0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--direct-large", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"1 thread, load average {os.getloadavg()[0]:.1f}")
    print("| classes x candidates x dims, picks | selection | Gram form (s) | direct form (s) | speed-up "
          "| Gram = float64 direct | float32 direct = float64 direct |")
    print("|---|---|---|---|---|---|---|")
    for C, n, d, k in CASES:
        g = torch.Generator().manual_seed(0)
        feats = F.normalize(torch.randn(C, n, d, generator=g), dim=2)
        valid = torch.ones(C, n, dtype=torch.bool)
        for name, fast, slow in (("herding", herding, direct_herding),
                                 ("dytox-herding", herding_with_replacement, direct_with_replacement)):
            picks, t_fast = timed(fast, feats, valid, k)
            if d > 10_000 and not args.direct_large:
                print(f"| {C} x {n} x {d}, {k} | {name} | {t_fast:.2f} | not run | - | - | - |", flush=True)
                continue
            previous, t_slow = timed(slow, feats, valid, k)
            exact = slow(feats.double(), valid, k)
            print(f"| {C} x {n} x {d}, {k} | {name} | {t_fast:.2f} | {t_slow:.2f} | {t_slow / t_fast:.0f}x | "
                  f"{agree(picks, exact)} | {agree(previous, exact)} |", flush=True)


def agree(picks, reference) -> str:
    """'yes', or where the first pick differs (class, step)."""
    for c, (a, b) in enumerate(zip(picks, reference)):
        a, b = a.tolist(), b.tolist()
        if a != b:
            step = next((j for j, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
            return f"no (class {c}, pick {step})"
    return "yes"


if __name__ == "__main__":
    main()
