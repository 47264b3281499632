"""Locality analyses of a ViT run (LPA, Zheng et al. 2023): non-locality per layer and head, attention heat maps,
and the eigenvalue spectrum of the final representation's covariance.

Works for any model whose attention modules expose `attention_map(*inputs) -> (B, H, Nq, Nk)` probabilities, called
with the same inputs as their forward: forward pre-hooks record each attention module's inputs during one forward
pass, then its `attention_map` is called on them. Conventions:
- patch tokens are the last `grid^2` tokens of a sequence (class or task tokens come first);
- a layer is *self-attention over patches* when Nq = Nk; its patch-to-patch block is used, each row renormalised to
  sum to one when the layer also attends to prefix tokens (so D stays an expected distance in patch units);
- a layer with Nq < Nk (class attention: the class token queries every token) has no non-locality, and its heat
  map is the class token's attention over the patches.

Non-locality (the LPA paper's eq. 1-2, ConViT's `get_attention_map`): with A-bar the attention averaged over the
batch, N the number of patches and delta_ij the (dx, dy) offset between patches in patch units,
    D_h = (1/N) sum_ij A-bar_h[i, j] ||delta_ij||,        D = mean_h D_h.
"""
from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import jsonfile

ANALYSES = ("nonlocality", "spectrum", "heatmaps")
HELDOUT_SEED = 0  # the held-out batch does not depend on run.seed: runs with other seeds see the same images


# --------------------------------------------------------------------------------------------- formulas
def patch_distances(grid: int, device: torch.device | None = None) -> torch.Tensor:
    """(N, N) Euclidean distance between patches i and j of a grid x grid raster, in patch units."""
    idx = torch.arange(grid * grid, device=device)
    row, col = (idx // grid).float(), (idx % grid).float()
    return torch.sqrt((row[:, None] - row[None]) ** 2 + (col[:, None] - col[None]) ** 2)


def nonlocality(attn: torch.Tensor) -> torch.Tensor:
    """Per-head non-locality D_h of patch-to-patch attention (B, H, N, N) or (H, N, N): (H,)."""
    if attn.ndim == 4:
        attn = attn.mean(0)
    H, N, M = attn.shape
    grid = math.isqrt(N)
    if N != M or grid * grid != N:
        raise ValueError(f"non-locality needs attention over a square grid of patches, got {N}x{M}")
    dist = patch_distances(grid, attn.device).to(attn.dtype)
    return torch.einsum("hij,ij->h", attn, dist) / N


def patch_block(attn: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Patch-to-patch block of a self-attention map (..., Nq, Nk), rows renormalised when prefix tokens were cut."""
    if attn.shape[-1] == num_patches and attn.shape[-2] == num_patches:
        return attn
    block = attn[..., -num_patches:, -num_patches:]
    return block / block.sum(-1, keepdim=True).clamp_min(1e-12)


def covariance_spectrum(features: torch.Tensor) -> torch.Tensor:
    """Eigenvalues, largest first, of the (D, D) covariance of (n, D) features (unbiased, centred)."""
    f = features.double()
    f = f - f.mean(0, keepdim=True)
    cov = f.T @ f / max(f.shape[0] - 1, 1)
    return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0).float()


# --------------------------------------------------------------------------------------------- collection
@dataclass
class LayerAttention:
    name: str  # module path (with #k when a module runs k > 1 times in one forward)
    attn: torch.Tensor  # (B, H, Nq, Nk) probabilities

    @property
    def is_self(self) -> bool:
        return self.attn.shape[-2] == self.attn.shape[-1]


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if callable(getattr(m, "attention_map", None))]


def find_grid(model: nn.Module) -> int:
    """Side of the patch grid, from the model's patch embedding (a module with `num_patches`)."""
    for m in model.modules():
        n = getattr(m, "num_patches", None)
        if isinstance(n, int) and n > 0:
            grid = math.isqrt(n)
            if grid * grid == n:
                return grid
    raise ValueError("no patch embedding with a square `num_patches` found: is this a ViT?")


@torch.no_grad()
def collect_attention(model: nn.Module, forward, x: torch.Tensor) -> list[LayerAttention]:
    """Run forward(x) once (eval mode, no grad) and return every attention module's map, in call order."""
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no attention module with an `attention_map` method")
    calls: list[tuple[str, nn.Module, tuple, dict]] = []
    handles = []
    for name, m in mods:
        def hook(mod, args, kwargs, name=name):
            calls.append((name, mod, args, kwargs))
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        forward(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    count: dict[str, int] = {}
    for name, *_ in calls:
        count[name] = count.get(name, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for name, mod, args, kwargs in calls:
        seen[name] = seen.get(name, 0) + 1
        label = name if count[name] == 1 else f"{name}#{seen[name]}"
        attention_map = typing.cast(typing.Callable[..., torch.Tensor], mod.attention_map)
        out.append(LayerAttention(label, attention_map(*args, **kwargs).float()))
    return out


# --------------------------------------------------------------------------------------------- one model
def heldout_indices(test_labels: torch.Tensor, n: int, seed: int = HELDOUT_SEED) -> torch.Tensor:
    """n test rows balanced over every class of the scenario (seen or not): the same for every task and run."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(test_labels), generator=g)
    labels = test_labels[perm]
    rank = torch.zeros_like(labels)
    for c in labels.unique():
        sel = labels == c
        rank[sel] = torch.arange(int(sel.sum()))
    order = torch.argsort(rank * (int(labels.max()) + 1) + labels, stable=True)
    return perm[order[:n]].sort().values


@dataclass
class TaskAnalysis:
    task: int
    layers: list[str]  # self-attention layers over patches, in call order
    nonlocality_heads: list[list[float]]  # [layer][head]
    nonlocality: list[float]  # [layer], mean over heads
    eigenvalues: list[float] | None = None
    heatmaps: dict | None = None  # {"layers": [...], "maps": (images, layers, grid, grid) list}

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "heatmaps"}


def analyse_method(method, x: torch.Tensor, task: int, analyses=ANALYSES, n_images: int = 4,
                   chunk: int = 64) -> TaskAnalysis:
    """The analyses of one trained method on a batch of normalised images x (run in chunks of `chunk`)."""
    model = method.model
    res = TaskAnalysis(task=task, layers=[], nonlocality_heads=[], nonlocality=[])
    if "nonlocality" in analyses or "heatmaps" in analyses:
        grid = find_grid(model)
        P = grid * grid
        sums: dict[str, torch.Tensor] = {}  # batch sums of the patch-to-patch maps, in call order
        for i, xc in enumerate(x.split(chunk)):
            maps = collect_attention(model, method.logits, xc)
            if i == 0 and "heatmaps" in analyses:
                res.heatmaps = heatmaps(maps, grid, n_images)
            for la in maps:
                if la.is_self and la.attn.shape[-1] >= P:
                    block = patch_block(la.attn, P).sum(0)
                    sums[la.name] = sums[la.name] + block if la.name in sums else block
        for name, total in sums.items():
            d = nonlocality(total / len(x))
            res.layers.append(name)
            res.nonlocality_heads.append(d.tolist())
            res.nonlocality.append(float(d.mean()))
    if "spectrum" in analyses:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            feats = torch.cat([method.embed(xc).float().flatten(1) for xc in x.split(chunk)])
        model.train(was_training)
        res.eigenvalues = covariance_spectrum(feats).tolist()
    return res


def heatmaps(maps: list[LayerAttention], grid: int, n_images: int) -> dict:
    """Per image and layer, a (grid, grid) map averaged over heads: the centre patch's attention for
    self-attention layers, the class token's for class attention."""
    P = grid * grid
    centre = (grid // 2) * grid + grid // 2
    names, out = [], []
    for la in maps:
        a = la.attn[:n_images].mean(1)  # (b, Nq, Nk)
        if a.shape[-1] < P:
            continue
        if la.is_self:
            row = patch_block(a, P)[:, centre]
        else:
            row = a[:, 0, -P:]
            row = row / row.sum(-1, keepdim=True).clamp_min(1e-12)
        names.append(la.name)
        out.append(row.reshape(-1, grid, grid))
    stacked = torch.stack(out, 1) if out else torch.zeros(0)
    return {"layers": names, "maps": stacked}


# --------------------------------------------------------------------------------------------- run folders
@dataclass
class HeldoutBatch:
    """The fixed held-out test batch the analyses run on."""

    x: torch.Tensor  # normalised images, on the device
    raw: torch.Tensor  # the same images as uint8, on the CPU (for the heat-map figure)
    labels: torch.Tensor  # their labels (class-order positions)


def heldout_batch(scenario, stream, augment, n_samples: int, batch_size: int) -> HeldoutBatch:
    """`n_samples` test images balanced over every class (`heldout_indices`), test-transformed."""
    idx = heldout_indices(scenario.test_labels, n_samples)
    xs, raws = [], []
    for x_u8, _ in stream(list(idx.split(batch_size))):
        xs.append(augment.test(x_u8))
        raws.append(x_u8.cpu())
    return HeldoutBatch(torch.cat(xs), torch.cat(raws), scenario.test_labels[idx])


def analyse_task(method, images: HeldoutBatch, task: int, out_dir: Path, analyses, n_images: int) -> TaskAnalysis:
    """Analyses of a trained method on the held-out batch; writes out_dir/task_{t}.json and the heat-map PNG
    (in out_dir's sibling plots/); returns the result."""
    res = analyse_method(method, images.x, task, analyses, n_images)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {**res.to_dict(), "heldout": {"n": len(images.x), "seed": HELDOUT_SEED}}
    _write_json(out_dir / f"task_{task}.json", doc)
    if res.heatmaps is not None and len(res.heatmaps["layers"]):
        labels = images.labels[:n_images].tolist()
        plot_heatmaps(images.raw[:n_images], res.heatmaps, labels,
                      out_dir.parent / "plots" / f"attention_task_{task}.png", f"after task {task + 1}")
    return res


def summarise(out_dir: Path, label: str = "") -> dict | None:
    """Gather out_dir/task_*.json into out_dir/locality.json and draw plots/nonlocality.png and spectrum.png."""
    files = sorted(out_dir.glob("task_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        return None
    docs = [json.loads(p.read_text()) for p in files]
    summary = {"tasks": [d["task"] for d in docs], "layers": docs[-1]["layers"],
               "nonlocality": [d["nonlocality"] for d in docs],
               "nonlocality_heads": [d["nonlocality_heads"] for d in docs],
               "eigenvalues": [d.get("eigenvalues") for d in docs]}
    _write_json(out_dir / "locality.json", summary)
    plots = out_dir.parent / "plots"
    if summary["layers"]:
        plot_nonlocality({label or "": summary}, plots / "nonlocality.png")
    if any(e for e in summary["eigenvalues"]):
        plot_spectrum(summary, plots / "spectrum.png", label)
    return summary


def _write_json(path: Path, doc: dict) -> None:
    jsonfile.write_atomic(path, doc)


# --------------------------------------------------------------------------------------------- plots
def plot_nonlocality(runs: dict[str, dict], path: Path) -> Path:
    """One panel per run: mean non-locality of each layer against the task index, one line per layer."""
    from .plots import _pyplot

    plt = _pyplot()
    n = len(runs)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), sharey=True, squeeze=False)
    for ax, (label, s) in zip(axes[0], runs.items()):
        values = torch.tensor(s["nonlocality"])  # (tasks, layers)
        tasks = [t + 1 for t in s["tasks"]]
        cmap = plt.get_cmap("viridis")
        L = values.shape[1]
        for layer in range(L):
            ax.plot(tasks, values[:, layer].tolist(), marker="o", ms=3, color=cmap(layer / max(L - 1, 1)),
                    label=f"layer {layer + 1}")
        ax.set(xlabel="task", title=label or None, xticks=tasks)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("non-locality (patches)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spectrum(summary: dict, path: Path, label: str = "") -> Path:
    from .plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    cmap = plt.get_cmap("viridis")
    T = len(summary["tasks"])
    for i, (t, ev) in enumerate(zip(summary["tasks"], summary["eigenvalues"])):
        if ev:
            ax.semilogy(range(1, len(ev) + 1), [max(v, 1e-12) for v in ev], color=cmap(i / max(T - 1, 1)),
                        label=f"task {t + 1}")
    ax.set(xlabel="eigenvalue index", ylabel="eigenvalue", title=f"representation covariance {label}".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmaps(images_u8: torch.Tensor, hm: dict, labels: list[int], path: Path, title: str = "") -> Path:
    """Rows: images; columns: the image, then each layer's map (upsampled to the image, drawn over it)."""
    from .plots import _pyplot

    plt = _pyplot()
    maps = hm["maps"]  # (n, layers, g, g)
    n, L = maps.shape[0], maps.shape[1]
    fig, axes = plt.subplots(n, L + 1, figsize=(1.5 * (L + 1), 1.5 * n + 0.4), squeeze=False)
    H, W = images_u8.shape[-2:]
    for i in range(n):
        img = images_u8[i].permute(1, 2, 0).numpy()
        img = img[..., 0] if img.shape[-1] == 1 else img
        cmap = "gray" if img.ndim == 2 else None
        axes[i][0].imshow(img, cmap=cmap)
        axes[i][0].set_title(f"label {labels[i]}", fontsize=7)
        for j in range(L):
            up = torch.nn.functional.interpolate(maps[i, j][None, None], size=(H, W), mode="nearest")[0, 0]
            axes[i][j + 1].imshow(img, cmap=cmap)
            axes[i][j + 1].imshow(up.numpy(), cmap="inferno", alpha=0.6)
            if i == 0:
                axes[i][j + 1].set_title(hm["layers"][j], fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
