"""results.json, the end-of-run summary table, and the Markdown comparison of several runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import VitclError
from .metrics import summarize


def _matrix(evals: list[dict], key: str) -> list[list[float]]:
    T = len(evals)
    return [[e[key][j] if j < len(e[key]) else math.nan for j in range(T)] for e in evals]


def best_during_training(evals: list[dict], periodic: list[dict], key: str) -> list[float]:
    """Per task j: the best accuracy on j's test set over the evaluations made while j itself was trained (the
    periodic ones and the one at its end). This is the public Mask-RKR code's protocol; it never sees what later
    tasks do to j, so it is reported beside the accuracy matrix, never in its place."""
    best = []
    for j, e in enumerate(evals):
        values = [p[key][j] for p in periodic if p["task"] == j and j < len(p[key])] + [e[key][j]]
        values = [v for v in values if not math.isnan(v)]
        best.append(max(values) if values else math.nan)
    return best


def build_results(cfg, scenario, evals: list[dict], tasks: list[dict], method,
                  periodic: list[dict] | None = None) -> dict:
    out = {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": cfg.data.dataset if not cfg.data.datasets else "+".join(cfg.data.datasets),
        "scenario": scenario.describe(),
        "increments": scenario.increments,
        "tasks_done": len(evals),
        "num_tasks": len(scenario),
        "tasks": tasks,
    }
    for name, key, seen_key in (("class_il", "class_il", "seen_class_il"), ("task_il", "task_il", "seen_task_il")):
        acc = _matrix(evals, key)
        seen = [e[seen_key] for e in evals]
        if any(math.isnan(v) for v in seen):
            out[name] = None
            continue
        out[name] = {"acc_matrix": acc, "seen_acc": seen, **summarize(acc, seen)}
        best = best_during_training(evals, periodic or [], key)
        out[name]["best_during_training"] = best
        out[name]["avg_best_during_training"] = sum(best) / len(best) if best else math.nan
    if out["class_il"] is not None:
        out["class_il"]["topk_matrix"] = _matrix(evals, "class_il_topk")
        out["class_il"]["seen_topk"] = [e["seen_class_il_topk"] for e in evals]
        out["class_il"]["avg_incremental_topk"] = sum(out["class_il"]["seen_topk"]) / max(len(evals), 1)
    names = sorted({name for e in evals for name in e.get("extra", {})})
    if names:  # extra scorers (iCaRL's NME ...): the same summaries, from the same evaluation passes
        out["extra"] = {name: _scorer_summary([e["extra"][name] for e in evals]) for name in names}
    if tasks:
        first = tasks[0]["params"]
        out["params"] = {"per_task": [t["params"] for t in tasks], "final": tasks[-1]["params"],
                         "growth_per_task": [t["params"] - first for t in tasks]}
    published = getattr(cfg, "published", None)
    if published is not None and published.values:
        out["published"] = {"source": published.source, "row": published.row, "column": published.column,
                            "values": dict(published.values), "std": dict(published.std)}
    return out


def measured(results: dict, metric: str) -> float | None:
    """The run's value of a `published.values` metric (None where the run has no such number)."""
    cil, til = results.get("class_il") or {}, results.get("task_il") or {}
    if metric == "params_m":
        final = (results.get("params") or {}).get("final")
        return final / 1e6 if final is not None else None
    if metric == "last_top5":
        seen = cil.get("seen_topk") or []
        return seen[-1] if seen else None
    section = til if metric.startswith("task_il_") else cil
    key = {"avg": "avg_incremental", "last": "last", "forgetting": "forgetting", "avg_top5": "avg_incremental_topk",
           "avg_best": "avg_best_during_training"}[metric.removeprefix("task_il_")]
    value = section.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def published_rows(results: dict) -> list[tuple[str, float, float | None, float | None]]:
    """(metric, published value, measured value, measured - published) for each number the run's preset names."""
    pub = results.get("published") or {}
    rows = []
    for metric, value in (pub.get("values") or {}).items():
        got = measured(results, metric)
        rows.append((metric, value, got, None if got is None else got - value))
    return rows


def published_cell(results: dict) -> str:
    pub = results.get("published") or {}
    return ", ".join(p for p in (pub.get("source"), pub.get("row"), pub.get("column")) if p)


def _scorer_summary(evals: list[dict]) -> dict:
    """class_il (with top-k) and task_il summaries of one extra scorer, over its per-task evaluation records."""
    out = {}
    for name, key, seen_key in (("class_il", "class_il", "seen_class_il"), ("task_il", "task_il", "seen_task_il")):
        acc, seen = _matrix(evals, key), [e[seen_key] for e in evals]
        out[name] = {"acc_matrix": acc, "seen_acc": seen, **summarize(acc, seen)}
    out["class_il"]["topk_matrix"] = _matrix(evals, "class_il_topk")
    out["class_il"]["seen_topk"] = [e["seen_class_il_topk"] for e in evals]
    out["class_il"]["avg_incremental_topk"] = sum(out["class_il"]["seen_topk"]) / max(len(evals), 1)
    return out


def _fmt(v, digits=2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def summary_table(results: dict) -> str:
    """Per-task accuracy after each step, then the summary metrics."""
    lines = [f"{results['method']} on {results['dataset']}: {results['scenario']}"]
    cil, til = results.get("class_il"), results.get("task_il")
    header = f"{'after task':>10} | {'class-IL':>9} | {'task-IL':>8} | {'params':>12} | {'time':>8}"
    lines += [header, "-" * len(header)]
    for i, t in enumerate(results["tasks"]):
        c = cil["seen_acc"][i] if cil else None
        k = til["seen_acc"][i] if til else None
        lines.append(f"{i + 1:>10} | {_fmt(c):>9} | {_fmt(k):>8} | {int(t['params']):>12,} | {t['seconds']:>7.1f}s")
    lines.append("")
    lines.append(f"{'':>22}{'class-IL':>10}{'task-IL':>10}")
    for key, label in (("avg_incremental", "avg incremental acc"), ("last", "last acc"),
                       ("forgetting", "forgetting"), ("bwt", "BWT")):
        lines.append(f"{label:>22}{_fmt(cil[key] if cil else None):>10}{_fmt(til[key] if til else None):>10}")
    if cil and results["tasks_done"]:
        lines.append(f"{'last top-5 acc':>22}{_fmt(cil['seen_topk'][-1]):>10}")
    for name, sc in results.get("extra", {}).items():
        lines.append(f"{'':>22}{name + ' scores':>20}")
        for key, label in (("avg_incremental", "avg incremental acc"), ("last", "last acc"),
                           ("forgetting", "forgetting")):
            lines.append(f"{label:>22}{_fmt(sc['class_il'][key]):>10}{_fmt(sc['task_il'][key]):>10}")
    if til and not cil and "avg_best_during_training" in til:  # task-conditioned methods
        lines.append(f"{'best while training*':>22}{_fmt(None):>10}{_fmt(til['avg_best_during_training']):>10}")
        lines.append("* mean over tasks of each task's best accuracy during its own training (the public Mask-RKR "
                     "code's protocol; old tasks are not re-evaluated there)")
    rows = published_rows(results)
    if rows:
        done = "" if results["tasks_done"] == results["num_tasks"] else " (the run has not finished its tasks)"
        lines += ["", f"published: {published_cell(results)}{done}"]
        lines += [f"{metric:>22}{_fmt(value):>10} measured {_fmt(got)} ({_signed(diff)})"
                  for metric, value, got, diff in rows]
    return "\n".join(lines)


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def load_results(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise VitclError(f"{path}: no results (is {run_dir} a vitcl run folder that finished a task?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VitclError(f"{path}: corrupt results file ({exc.msg} at line {exc.lineno})") from None


def short_path(path: str, keep: int = 3) -> str:
    """A path for a table cell: the home folder as ~, and only the last `keep` parts of a deep path."""
    home = str(Path.home())
    if path == home or path.startswith(home.rstrip("/") + "/"):
        path = "~" + path[len(home):]
    parts = Path(path).parts
    if len(parts) > keep + 1:
        return "…/" + "/".join(parts[-keep:])
    return path


def data_source(run_dir: Path) -> str:
    """Each dataset of a run and where it was read from, from its data.json ("-" for runs made before it)."""
    path = Path(run_dir) / "data.json"
    if not path.exists():
        return "-"
    try:
        datasets = json.loads(path.read_text())["datasets"]
        cells = []
        for d in datasets:
            embedded = d.get("embedded")
            if embedded:
                where = f"{embedded['package']} {embedded['version']}"
            else:
                where = short_path(d["folder"]) if d.get("folder") else "?"
            cells.append(f"{d['dataset']} ({where})")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise VitclError(f"{path}: corrupt data record ({exc})") from None
    return " + ".join(cells).replace("|", "\\|") or "-"


def comparison_table(run_dirs: list[Path]) -> str:
    rows = ["| run | method | data | scenario | tasks | CIL avg | CIL last | CIL forg. | TIL avg | TIL last "
            "| TIL forg. | #P final | time (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    loaded = [(Path(d), load_results(d)) for d in run_dirs]
    for d, r in loaded:
        cil, til = r.get("class_il") or {}, r.get("task_il") or {}
        secs = sum(t["seconds"] for t in r["tasks"])
        params = r.get("params", {}).get("final")
        scored = [("", cil, til)] + [(f" ({name})", sc["class_il"], sc["task_il"])
                                     for name, sc in r.get("extra", {}).items()]
        for suffix, cil, til in scored:  # one row per extra scorer, below the run's main row
            rows.append(f"| {Path(d).name}{suffix} | {r['method']}{suffix} | {data_source(d)} | {r['scenario']} "
                        f"| {r['tasks_done']}/{r['num_tasks']} "
                        f"| {_fmt(cil.get('avg_incremental'))} | {_fmt(cil.get('last'))} "
                        f"| {_fmt(cil.get('forgetting'))} "
                        f"| {_fmt(til.get('avg_incremental'))} | {_fmt(til.get('last'))} "
                        f"| {_fmt(til.get('forgetting'))} "
                        f"| {f'{params / 1e6:.2f}M' if params else '-'} | {secs:.0f} |")
    targets = []
    for d, r in loaded:
        for metric, value, got, diff in published_rows(r):
            targets.append(f"| {d.name} | {published_cell(r)} | {metric} | {_fmt(value)} | {_fmt(got)} "
                           f"| {_signed(diff)} |")
    if targets:
        rows += ["", "| run | published cell | metric | published | measured | difference |",
                 "|---|---|---|---|---|---|", *targets]
    return "\n".join(rows)
