"""The paper table of a sweep: per row (a preset, over its seeds and class orders), the mean and the sample
standard deviation (ddof=1, as numpy.std(ddof=1) and the DyTox tables' "± 0.02" over three orders read it) of each
metric, beside the value the preset's `published:` section names and the difference. Plain lists and dicts, no
pandas; Markdown, CSV, LaTeX and strict JSON renderings, and the accuracy-versus-classes figure."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from .jsonfile import dumps
from .report import measured

STD_KIND = "sample standard deviation (ddof=1) over the row's runs"
METRIC_LABELS = {"avg": "Avg", "last": "Last", "forgetting": "Forg.", "avg_top5": "Avg top-5",
                 "last_top5": "Last top-5", "task_il_avg": "TIL Avg", "task_il_last": "TIL Last",
                 "task_il_forgetting": "TIL Forg.", "task_il_avg_best": "TIL best", "params_m": "#P (M)"}
ALWAYS = ("avg", "last", "forgetting", "params_m")  # shown when measured; the rest only where a preset names them
TASK_IL = ("task_il_avg", "task_il_last", "task_il_forgetting")  # shown too when a row has no class-IL score
CELL_FIELDS = ("mean", "std", "n", "published", "published_std", "diff")


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1; None for a single value, where it is undefined)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Group:
    """The runs of one table row: their results.json contents."""

    label: str
    preset: str
    results: list[dict]


def _published(results: list[dict]) -> dict:
    for r in results:
        if (r.get("published") or {}).get("values"):
            return r["published"]
    return {}


def _columns(groups: list[Group]) -> list[str]:
    named = {m for g in groups for m in (_published(g.results).get("values") or {})}
    has = {m for g in groups for r in g.results for m in METRIC_LABELS if measured(r, m) is not None}
    no_cil = any(not r.get("class_il") for g in groups for r in g.results)
    return [m for m in METRIC_LABELS
            if m in has and (m in ALWAYS or m in named or (no_cil and m in TASK_IL))]


@dataclass
class Table:
    metrics: list[str]
    rows: list[dict] = field(default_factory=list)  # flat: row, preset, runs, source, <metric>_<CELL_FIELDS>

    # ----------------------------------------------------------------------------- renderings
    def _cell(self, row: dict, m: str, pm: str = "±") -> str:
        mean, std = row[f"{m}_mean"], row[f"{m}_std"]
        if mean is None:
            return "-"
        text = f"{mean:.2f}" + (f" {pm} {std:.2f}" if std is not None else "")
        pub = row[f"{m}_published"]
        if pub is not None:
            pstd = row[f"{m}_published_std"]
            text += f" / {pub:.2f}" + (f" {pm} {pstd:.2f}" if pstd is not None else "") + f" ({row[f'{m}_diff']:+.2f})"
        return text

    def to_markdown(self) -> str:
        head = ["row", "runs", *(METRIC_LABELS[m] for m in self.metrics)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            cells = [row["row"].replace("|", "\\|"), str(row["runs"]), *(self._cell(row, m) for m in self.metrics)]
            lines.append("| " + " | ".join(cells) + " |")
        published = any(row[f"{m}_published"] is not None for row in self.rows for m in self.metrics)
        lines += ["", f"mean ± {STD_KIND}" + (" / published value (difference, measured - published)."
                                               if published else ".")]
        sources = sorted({row["source"] for row in self.rows if row["source"]})
        lines += [f"published: {s}" for s in sources]
        return "\n".join(lines)

    def to_csv(self) -> str:
        buf = io.StringIO()
        fields = ["row", "preset", "runs", "source", *(f"{m}_{f}" for m in self.metrics for f in CELL_FIELDS)]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
        return buf.getvalue()

    def to_latex(self) -> str:
        def esc(text: str) -> str:
            text = text.replace("\\", "\0")
            for a in "&%_#${}":
                text = text.replace(a, "\\" + a)
            return text.replace("\0", r"\textbackslash{}")

        lines = [r"\begin{tabular}{l" + "r" * (1 + len(self.metrics)) + "}", r"\toprule",
                 " & ".join(["Row", "Runs", *(esc(METRIC_LABELS[m]) for m in self.metrics)]) + r" \\", r"\midrule"]
        for row in self.rows:
            cells = [esc(row["row"]), str(row["runs"]), *(self._cell(row, m, "$\\pm$") for m in self.metrics)]
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines)

    def to_json(self) -> str:
        return dumps({"std": STD_KIND, "metrics": self.metrics, "rows": self.rows}, indent=1)


def aggregate(groups: list[Group]) -> Table:
    table = Table(_columns(groups))
    for g in groups:
        pub = _published(g.results)
        row: dict = {"row": g.label, "preset": g.preset, "runs": len(g.results),
                     "source": ", ".join(p for p in (pub.get("source"), pub.get("row"), pub.get("column")) if p)}
        for m in table.metrics:
            values = [v for v in (measured(r, m) for r in g.results) if v is not None]
            mean, std = mean_std(values)
            published = (pub.get("values") or {}).get(m)
            row.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_n": len(values), f"{m}_published": published,
                        f"{m}_published_std": (pub.get("std") or {}).get(m),
                        f"{m}_diff": None if mean is None or published is None else mean - published})
        table.rows.append(row)
    return table


def accuracy_curve(results: dict) -> tuple[list[int], list[float]] | None:
    """(classes seen after each task, accuracy on them): class-IL, or task-IL where a run has no class-IL."""
    section = results.get("class_il") or results.get("task_il")
    if not section:
        return None
    seen, total = [], 0
    for inc in results["increments"][: len(section["seen_acc"])]:
        total += inc
        seen.append(total)
    return seen, section["seen_acc"]


def plot_groups(groups: list[Group], path: Path) -> Path:
    """Accuracy versus number of classes for every row in one figure, mean line with a shaded ±std band."""
    from .plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for g in groups:
        curves = [c for c in (accuracy_curve(r) for r in g.results) if c is not None]
        if not curves:
            continue
        steps = min(len(c[1]) for c in curves)
        x = curves[0][0][:steps]
        stats = [mean_std([c[1][i] for c in curves]) for i in range(steps)]
        mean = [s[0] or 0.0 for s in stats]
        std = [s[1] or 0.0 for s in stats]
        (line,) = ax.plot(x, mean, marker="o", markersize=3, label=f"{g.label} (n={len(curves)})")
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2)
    ax.set(xlabel="number of classes", ylabel="accuracy on seen classes (%)", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
