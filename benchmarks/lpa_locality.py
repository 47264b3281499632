"""Locality across tasks (LPA, Zheng et al. 2023) on Fashion-MNIST B2-2: joint training, LPA's baseline and the
baseline w/LPA (LPSA in every self-attention block). Each run records, after every task, the non-locality of each
layer on a fixed held-out batch (eval.analyses); this script plots them side by side and writes the section of
BENCHMARKS.md with the runs' Avg / Last / Forgetting.

    python benchmarks/lpa_locality.py [key=value ...]      # overrides apply to all three runs
"""
from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
from pathlib import Path

from report import ROOT, fmt, machine, run_preset, update_section

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "lpa-locality"
RUNS = (("joint", "joint"), ("baseline", "baseline"), ("lpa", "baseline w/LPA"))


def main(overrides: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from vitcl.eval.locality import plot_nonlocality

    out = Path(tempfile.mkdtemp(prefix="vitcl-lpa-"))
    summaries, rows, nl_rows, total_cpu = {}, [], [], 0.0
    for name, label in RUNS:
        cpu0 = _children_cpu()
        res, wall = run_preset(str(CONFIGS / "common.yaml"), out, name, [str(CONFIGS / f"{name}.yaml"), *overrides])
        cpu = _children_cpu() - cpu0
        total_cpu += cpu
        loc = json.loads((out / name / "analysis" / "locality.json").read_text())
        summaries[label] = loc
        cil = res["class_il"]
        rows.append(f"| {label} | {fmt(cil['avg_incremental'])} | {fmt(cil['last'])} | {fmt(cil['forgetting'])} "
                    f"| {res['params']['final'] / 1e3:.1f}k | {wall:.0f} | {cpu:.0f} |")
        for t, per_layer in zip(loc["tasks"], loc["nonlocality"]):
            nl_rows.append(f"| {label} | {t + 1} | " + " | ".join(f"{d:.3f}" for d in per_layer) + " |")
        shutil.copy(out / name / "plots" / f"attention_task_{loc['tasks'][-1]}.png",
                    HERE / f"lpa_attention_{name}.png")
    plot = plot_nonlocality(summaries, HERE / "lpa_nonlocality.png")
    spectrum_rows = plot_final_spectra(summaries, HERE / "lpa_spectrum.png")
    layers = len(next(iter(summaries.values()))["layers"])
    cmd = "python benchmarks/lpa_locality.py" + "".join(f" {o}" for o in overrides)
    body = f"""Command: `{cmd}`. Configs in `benchmarks/lpa-locality/`: Fashion-MNIST padded to 32x32, B2-2 (5 tasks of
2 classes), 500 training and 300 test images per class; a ConViT with 3 self-attention blocks + 1 class-attention
block, dim 64, 4 heads, 8x8 patches (a 4x4 grid); 15 epochs per task, AdamW lr 2e-3 (cosine, 1 warm-up epoch),
batch 64, no MixUp, one torch thread. Baseline and w/LPA (LPSA in the 3 self-attention blocks): memory of 200 by
herding, distillation on the memory samples, 4 finetuning epochs on the memory with encoder and decoder frozen.
Joint: the same network trained at each stage on all the data seen so far (softmax cross-entropy, no memory).
Machine: {machine()}, shared with other jobs
(wall times are inflated by them; CPU time is user + sys of the run). Total CPU time: {total_cpu / 60:.1f} min.

Class-IL accuracy (%) on the seen classes' test images:

| run | Avg | Last | Forgetting | #P final | wall (s) | CPU (s) |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

Non-locality D = (1/N) sum_ij A_ij ||delta_ij|| (patch units, mean over heads) of each self-attention layer after
each task, on the same 200 held-out test images (all classes) for every run and task; uniform attention on a 4x4
grid gives 2.01, attention to the query patch alone 0. Plot: `benchmarks/{plot.name}` (one panel per run, one
line per layer); attention heat maps after the last task: `benchmarks/lpa_attention_{{joint,baseline,lpa}}.png`.

| run | task | """ + " | ".join(f"layer {i + 1}" for i in range(layers)) + " |\n|---|---|" + "---|" * layers + "\n" + \
        "\n".join(nl_rows) + "\n\n![non-locality per layer across tasks](benchmarks/lpa_nonlocality.png)\n" + """
Eigenvalues of the covariance of the final representation (the class token's embedding, 64 dimensions) on the same
200 images after the last task (LPA's transferability figure; plot `benchmarks/lpa_spectrum.png`). Baseline and
w/LPA embed with the raw class-attention output (their classifiers normalise it), joint after the backbone's final
LayerNorm, so only the first two compare in scale:

| run | largest 5 | sum | eigenvalues above 1% of the largest |
|---|---|---|---|
""" + "\n".join(spectrum_rows) + "\n"
    update_section("LPA: locality across tasks on Fashion-MNIST (B2-2)", body)
    print(body)


def plot_final_spectra(summaries: dict, path: Path) -> list[str]:
    from vitcl.eval.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    rows = []
    for label, s in summaries.items():
        ev = s["eigenvalues"][-1]
        ax.semilogy(range(1, len(ev) + 1), [max(v, 1e-12) for v in ev], label=label)
        top = ", ".join(f"{v:.3g}" for v in ev[:5])
        rows.append(f"| {label} | {top} | {sum(ev):.3g} | {sum(v > 0.01 * ev[0] for v in ev)} |")
    ax.set(xlabel="eigenvalue index", ylabel="eigenvalue", title="representation covariance, last task")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rows


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    main(sys.argv[1:])
