"""Plots of a run: accuracy after each task, and the accuracy-matrix heat map (PNG, matplotlib Agg)."""
from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("class_il", "class-IL"), ("task_il", "task-IL")):
        r = results.get(key)
        if r:
            ax.plot(range(1, len(r["seen_acc"]) + 1), r["seen_acc"], marker="o", label=label)
    ax.set(xlabel="tasks learned", ylabel="accuracy on seen classes (%)", ylim=(0, 100),
           title=f"{results['method']} · {results['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    for key, label in (("class_il", "class-IL"), ("task_il", "task-IL")):
        r = results.get(key)
        if not r:
            continue
        m = r["acc_matrix"]
        T = len(m)
        fig, ax = plt.subplots(figsize=(1.2 + 0.55 * T, 1.0 + 0.5 * T))
        data = [[v if not math.isnan(v) else float("nan") for v in row] for row in m]
        im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis")
        for i in range(T):
            for j in range(i + 1):
                ax.text(j, i, f"{m[i][j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i][j] < 60 else "black")
        ax.set(xlabel="evaluated task", ylabel="after training task", title=f"{label} accuracy (%)",
               xticks=range(T), yticks=range(T), xticklabels=range(1, T + 1), yticklabels=range(1, T + 1))
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out_dir / f"acc_matrix_{key}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
