"""vitcl run | resume | eval | analyze | report | params | datasets | presets | sweep."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import VitclError

if TYPE_CHECKING:
    from .data.scenario import Scenario

_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # str.splitlines' line ends: escaped in an error line
from .api import DEFAULT_PRESET  # noqa: E402  (`vitcl run` with no argument: the embedded demo)


def _split_args(items: list[str]) -> tuple[list[str], list[str]]:
    sources = [a for a in items if "=" not in a]
    overrides = [a for a in items if "=" in a]
    return sources, overrides


def cmd_run(args) -> int:
    from .api import prepare_run

    sources, overrides = _split_args(args.items)
    trainer = prepare_run(sources or [DEFAULT_PRESET], overrides, progress=not args.quiet)
    return _fit_and_report(trainer, None)


# ------------------------------------------------------------------ stopping: Ctrl-C and SIGTERM
_stopped_by: list[int] = []  # the signal that stopped this command, once one has


def _on_stop_signal(signum: int, frame) -> None:
    """SIGINT and SIGTERM: stop with KeyboardInterrupt, except inside a checkpoint write (it ends first and
    the signal comes again). Later ones are ignored, up to the process's exit: the clean-up of the first runs
    to its end, and the exit code stays 130 or 143."""
    if _stopped_by:
        return
    ckpt = sys.modules.get("vitcl.engine.checkpoint")
    if ckpt is not None and ckpt.defer_signal(signum):
        return
    _stopped_by.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def _stop_code() -> int:
    return 128 + (_stopped_by[0] if _stopped_by else signal.SIGINT)


def _stop_name() -> str:
    return "terminated (SIGTERM)" if _stop_code() == 128 + signal.SIGTERM else "interrupted"


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what the closed pipe did not take
    raises nothing more."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError):  # a stand-in without a descriptor (a notebook's, a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _install_stop_handlers() -> dict:
    """Handlers for run and resume; returns the previous ones (for main to put back)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


def _fit_and_report(trainer, optimizer_state) -> int:
    import torch

    from .data import distributed as dist
    from .engine.trainer import write_results
    from .errors import TrainingError
    from .eval.plots import write_plots
    from .eval.report import summary_table

    try:
        results = trainer.fit(optimizer_state)
    except KeyboardInterrupt:
        end_line = "\n" if trainer.progress.tty else ""  # the progress line is redrawn in place on a terminal
        print(f"{end_line}{_stop_name()}; `vitcl resume {trainer.run_dir}` continues from the last checkpoint",
              file=sys.stderr)
        return _stop_code()
    except torch.OutOfMemoryError as exc:
        what = (str(exc).strip().splitlines() or ["out of memory"])[0].split(". ")[0].rstrip(".")
        raise TrainingError(f"{trainer.device}: {what}; the last checkpoint in {trainer.ckpt_dir} is intact. Lower "
                            f"train.batch_size (train.grad_accum keeps the batch) or eval.batch_size (or set "
                            f"eval.fit_batch: true) in {trainer.run_dir / 'config.yaml'}, then `vitcl resume "
                            f"{trainer.run_dir}`") from None
    if dist.is_main():
        write_results(trainer.run_dir, results)
        write_plots(results, trainer.run_dir / "plots")
        print(summary_table(results))
        print(f"\nresults: {trainer.run_dir / 'results.json'}")
    dist.shutdown()
    return 0


def cmd_resume(args) -> int:
    from .data import distributed as dist
    from .engine import checkpoint
    from .engine.trainer import Trainer, rewind_metrics
    from .runconfig import changed_keys, load_run_config

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir).config
    for stale in [*run_dir.glob("*.tmp"), *run_dir.glob("checkpoints/*.tmp"), *run_dir.glob("analysis/*.tmp")]:
        stale.unlink()  # a write interrupted by the kill; the file it was replacing is intact
    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists() and not list(run_dir.glob("checkpoints/task_*.pt")):
        # stopped before its first checkpoint: nothing was kept but the config, so the run starts over
        print(f"{run_dir}: stopped before its first checkpoint; starting it from the beginning", file=sys.stderr)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        return _fit_and_report(Trainer(cfg, run_dir, progress=not args.quiet), None)
    ckpt = checkpoint.load(last)
    changes = changed_keys(ckpt["config"], cfg.to_dict()) if isinstance(ckpt.get("config"), dict) else []
    trainer = Trainer(cfg, run_dir, progress=not args.quiet)
    try:
        optimizer_state = trainer.restore(ckpt)
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:
        what = (f"{_describe_changes(changes)} changed in {run_dir / 'config.yaml'} since the run started" if changes
                else f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else '?'}")
        raise VitclError(f"{last}: the checkpoint does not fit the run's config ({what}); resume needs the config "
                         f"the run started with") from None
    if changes and dist.is_main():
        print(f"note: {_describe_changes(changes)} changed in {run_dir / 'config.yaml'} since the run started; "
              f"the results may differ from an uninterrupted run", file=sys.stderr)
    rewind_metrics(run_dir, ckpt)  # drop what was logged after the checkpoint: it is done again
    s = trainer.state
    if s.task >= len(trainer.scenario):
        print(f"{run_dir}: all {len(trainer.scenario)} tasks are done; nothing to resume", file=sys.stderr)
        return _fit_and_report(trainer, optimizer_state)
    before = ckpt.get("world_size")
    if before is not None and before != trainer.world:
        if dist.is_main():
            print(f"note: the run so far used {_processes(before)} and goes on with {_processes(trainer.world)}; "
                  f"recorded in metrics.jsonl", file=sys.stderr)
        trainer.log_metrics({"kind": "resume", "task": s.task, "phase": s.phase, "epoch": s.epoch,
                             "previous_world_size": before, "world_size": trainer.world})
    print(f"resuming {run_dir} at task {s.task + 1}/{len(trainer.scenario)}, phase {s.phase + 1}, epoch {s.epoch}",
          file=sys.stderr)
    return _fit_and_report(trainer, optimizer_state)


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")


def _describe_changes(changes: list, most: int = 3) -> str:
    text = ", ".join(f"{key} (was {old!r}, now {new!r})" for key, old, new in changes[:most])
    return text + (f" and {len(changes) - most} more" if len(changes) > most else "")


def _finished_run(run_dir: Path, purpose: str):
    """A trainer over a finished run's config, after checking that the run has task checkpoints."""
    from .engine.trainer import Trainer, task_checkpoints
    from .runconfig import load_run_config

    cfg = load_run_config(run_dir).config
    if not task_checkpoints(run_dir):
        raise VitclError(f"{run_dir / 'checkpoints'}: no task checkpoints (task_N.pt) to {purpose}")
    return Trainer(cfg, run_dir, progress=False)


def cmd_eval(args) -> int:
    import torch

    from .eval import jsonfile
    from .eval.report import build_results, summary_table

    run_dir = Path(args.run_dir)
    trainer = _finished_run(run_dir, "evaluate")
    evals, tasks = [], []
    for t, ckpt in trainer.restore_task_checkpoints():
        with torch.no_grad():
            evals.append(trainer.evaluate(t))
        tasks.append(ckpt["progress"]["tasks"][t])
        print(f"evaluated task_{t}.pt", file=sys.stderr)
    results = build_results(trainer.cfg, trainer.scenario, evals, tasks, trainer.method)
    jsonfile.write_atomic(run_dir / "eval.json", results)
    print(summary_table(results))
    print(f"\nre-evaluation: {run_dir / 'eval.json'}")
    return 0


def cmd_analyze(args) -> int:
    from .eval.locality import ANALYSES, analyse_task, heldout_batch, summarise

    run_dir = Path(args.run_dir)
    analyses = args.analyses.split(",") if args.analyses else list(ANALYSES)
    bad = [a for a in analyses if a not in ANALYSES]
    if bad:
        raise VitclError(f"--analyses: unknown {bad}; expected a comma list of {', '.join(ANALYSES)}")
    trainer = _finished_run(run_dir, "analyse")
    cfg = trainer.cfg
    samples = args.samples or cfg.eval.analysis_samples
    n_images = args.images if args.images is not None else cfg.eval.analysis_images
    out = run_dir / "analysis"
    images = heldout_batch(trainer.scenario, trainer.test_stream, trainer.augment, samples, cfg.eval.batch_size)
    for t, _ in trainer.restore_task_checkpoints():
        res = analyse_task(trainer.method, images, t, out, analyses, n_images)
        layers = " ".join(f"{d:.2f}" for d in res.nonlocality)
        print(f"task {t + 1}: non-locality per layer {layers}" if layers else f"task {t + 1}: analysed",
              file=sys.stderr)
    summarise(out, cfg.method.name)
    print(f"analysis: {out / 'locality.json'} · plots: {run_dir / 'plots'}")
    return 0


def cmd_report(args) -> int:
    from .eval.report import comparison_table
    from .sweep import SWEEP_FILE

    paths = [Path(d) for d in args.run_dirs]
    if any((p / SWEEP_FILE).exists() for p in paths) or args.format or args.plot:
        return _paper_table(paths, args.format or "markdown", args.plot)
    print(comparison_table(paths))
    return 0


def _paper_table(paths: list[Path], fmt: str, plot: str | None) -> int:
    """vitcl report SWEEP_DIR: one row per preset, mean ± std over its seeds and orders beside the published."""
    from .eval.aggregate import aggregate, plot_groups
    from .sweep import report_groups

    groups = report_groups(paths, say=lambda text: print(text, file=sys.stderr))
    table = aggregate(groups)
    print({"markdown": table.to_markdown, "csv": table.to_csv, "latex": table.to_latex,
           "json": table.to_json}[fmt]().rstrip("\n"))
    if plot:
        print(f"plot: {plot_groups(groups, Path(plot))}", file=sys.stderr)
    return 0


def cmd_sweep(args) -> int:
    from .sweep import import_submitit, launch, load_sweep, new_sweep

    launcher = _sweep_launcher(args)
    if launcher.get("name") == "slurm":
        import_submitit()  # its absence is known before anything runs
    if args.resume:
        if args.items or args.grid:
            raise VitclError("--resume SWEEP_DIR takes no presets, overrides or --grid: the sweep.yaml has them")
        sweep = load_sweep(Path(args.resume))
        if args.launcher:
            sweep.launcher = launcher
    else:
        sources, overrides = _split_args(args.items)
        sweep = new_sweep(sources, overrides, args.grid, args.out, launcher)
    failed = launch(sweep, _sweep_in_process, quiet=args.quiet)
    done = sum(r.state == "done" for r in sweep.runs)
    print(f"sweep {sweep.folder}: {done}/{len(sweep.runs)} runs done" + (f", {len(failed)} failed:" if failed else ""))
    for run in failed:
        print(f"  {run.name}: {run.error}")
    if failed:
        print(f"`vitcl sweep --resume {sweep.folder}` runs the failed and missing ones again")
    print(f"`vitcl report {sweep.folder}` prints the table")
    return 1 if failed else 0


def _sweep_launcher(args) -> dict:
    name = args.launcher or "sequential"
    if name != "local" and (args.gpus or args.slots):
        raise VitclError(f"--gpus and --slots belong to --launcher local, not {name}")
    if name != "slurm" and (args.partition or args.account or args.gpus_per_run or args.timeout):
        raise VitclError(f"--partition, --account, --gpus-per-run and --timeout belong to --launcher slurm, not {name}")
    if name == "local":
        if args.gpus and args.slots:
            raise VitclError("--gpus and --slots: give one (a run per GPU, or N runs on the CPU at once)")
        gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else []
        if any(not g for g in gpus):
            raise VitclError(f"--gpus {args.gpus}: expected a comma list of GPU indices such as 0,1,2,3")
        if args.slots is not None and args.slots < 1:
            raise VitclError(f"--slots {args.slots}: expected a number of processes >= 1")
        return {"name": name, "gpus": gpus, "slots": args.slots or (len(gpus) or 1)}
    if name == "slurm":
        if not args.partition:
            raise VitclError("--launcher slurm needs --partition P")
        if (args.gpus_per_run or 1) < 1 or (args.timeout or 60) < 1:
            raise VitclError("--gpus-per-run and --timeout: expected positive numbers")
        return {"name": name, "partition": args.partition, "account": args.account,
                "gpus_per_run": args.gpus_per_run or 1, "timeout": args.timeout or 60}
    return {"name": name}


def _sweep_in_process(argv: list[str]) -> tuple[int, str | None]:
    """One `vitcl run|resume` of a sweep in this process: its exit code and the one-line error it printed. A
    failure of the run (a bug included) is the run's, not the sweep's; a stop signal stops the sweep."""
    import traceback

    args = make_parser().parse_args(argv)
    try:
        rc, error = args.fn(args), None
    except VitclError as exc:
        error = _error_text(exc)
        print(f"vitcl: error: {error}", file=sys.stderr)
        rc = exc.exit_code
    except Exception as exc:  # noqa: BLE001 - reported as this run's failure
        traceback.print_exc()
        lines = str(exc).strip().splitlines()
        error, rc = f"{exc.__class__.__name__}: {lines[0] if lines else ''}", 1
    if _stopped_by:
        raise KeyboardInterrupt
    return rc, error


def _error_text(exc: VitclError) -> str:
    return "".join(c.encode("unicode_escape").decode() if c in _LINE_BREAKS else c for c in str(exc))


def _build_for_count(cfg, scenario):
    """The method's model on the meta device (shapes only, no memory, instant); on CPU if the method needs real
    tensors to build. Pretrained weights are never loaded for counting."""
    import torch

    from .methods import METHODS

    if hasattr(cfg.model, "pretrained"):
        cfg.model.pretrained = None
    cls = METHODS.get(cfg.method.name, "method.name")
    try:
        with torch.device("meta"):
            return cls(cfg, scenario, torch.device("meta")), torch.device("meta")
    except (NotImplementedError, RuntimeError):
        return cls(cfg, scenario, torch.device("cpu")), torch.device("cpu")


def param_rows(cfg) -> tuple[list[dict], Scenario]:
    """Per task: total and trainable parameters after begin_task and the first phase's setup, growth over the
    first task and, where the method has a reference (one backbone with one head), the % increase over it."""
    import torch

    from .data.build import build_scenario

    scenario = build_scenario(cfg.data, shapes_only=True)
    method, device = _build_for_count(cfg, scenario)
    rows = []
    with torch.device(device):
        for task in scenario:
            method.begin_task(task)
            for phase in method.phases(task)[:1]:
                method.setup_phase(phase, task)
            c = method.count_parameters()
            rows.append({"task": task.index, "classes_seen": task.end, "total": c.total, "trainable": c.trainable})
    base, ref = rows[0]["total"], method.reference_count()
    for r in rows:
        r["growth"] = r["total"] - base
        r["increase_pct"] = 100 * (r["total"] / ref - 1) if ref else None
    return rows, scenario


def millions(n: float, rounding: str = "truncate") -> str:
    """n in millions with two decimals, truncated (DyTox's tables) or rounded (the Mask-RKR table)."""
    if rounding == "round":
        return f"{n / 1e6:.2f}"
    return f"{math.floor(n / 1e4 + 1e-9) / 100:.2f}"


def cmd_params(args) -> int:
    from .eval import jsonfile
    from .runconfig import load_config

    sources, overrides = _split_args(args.items)
    cfg, _ = load_config(sources or [DEFAULT_PRESET], overrides)
    rows, scenario = param_rows(cfg)
    if args.json:
        print(jsonfile.dumps(rows, indent=1))
        return 0
    print(f"{cfg.method.name} · {cfg.model.name} · {scenario.describe()}")
    pct = rows[0]["increase_pct"] is not None
    print(f"{'task':>5} {'classes':>8} {'total':>16} {'(M)':>8} {'trainable':>14} {'growth':>12}"
          + (f" {'vs 1 backbone+head':>19}" if pct else ""))
    def num(x: float) -> str:  # binary masks make counts fractional
        return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.2f}"

    for r in rows:
        total = f"{num(r['total']):>16} {millions(r['total'], args.rounding):>8}"
        print(f"{r['task'] + 1:>5} {r['classes_seen']:>8} {total} {num(r['trainable']):>14} {r['growth']:>+12,.0f}"
              + (f" {r['increase_pct']:>+18.2f}%" if pct else ""))
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench
    from .errors import ConfigError

    sources, overrides = _split_args(args.items)
    if not sources:
        raise ConfigError("vitcl bench: name a preset, e.g. vitcl bench dytox/cifar100-b0inc10")
    try:
        tasks = [int(t) for t in args.tasks.split(",")]
    except ValueError:
        raise ConfigError(f"--tasks: expected task counts such as 1,10,50, got '{args.tasks}'") from None
    compile_modes = [False, True] if args.compile == "both" else [args.compile == "on"]
    _, table = run_bench(sources, overrides, tasks, args.precision.split(","), compile_modes, args.batch,
                         args.steps, args.warmup, say=lambda line: print(line, file=sys.stderr, flush=True))
    print(table)
    return 0


def cmd_datasets(args) -> int:
    import shutil
    import textwrap

    from .data.sources import SOURCES, get_source

    if args.verify:
        return _verify_dataset(args.verify, args.data_root, args.workers)
    width = max(60, min(shutil.get_terminal_size((100, 20)).columns, 110))
    indent = " " * 4
    root = args.data_root
    if root:
        print(f"Data sources, looked for only under DIR={root} (as data.root=DIR does in a run): <DIR>/<name>, "
              f"then DIR itself.")
    else:
        print("Data sources, looked for in the places listed (a run with data.root=DIR, or --data-root DIR here, "
              "looks only under DIR).")
    for name in SOURCES.names():
        src = get_source(name)
        if src.name != name:  # an alias: listed with its source
            continue
        title = name + (f" ({', '.join(src.aliases)})" if src.aliases else "")
        classes = src.num_classes or "?"
        shape = f"{src.channels}x{src.image_size}x{src.image_size}"
        found = src.locate(root)
        print(f"\n{title:<24} {classes:>5} classes  {shape:<10} {'found' if found else 'MISSING'}")
        if src.origin:
            print(textwrap.fill(f"what: {src.origin}", width, initial_indent=indent, subsequent_indent=indent + "    ",
                                break_on_hyphens=False))
        if found:
            print(textwrap.fill(f"at: {found}", width, initial_indent=indent, subsequent_indent=indent + "    "))
            continue
        paths = src.search_paths(root)
        where = ", ".join(str(p) for p in paths) if paths else "nowhere until data.root is set"
        print(textwrap.fill(f"looks in: {where}", width, initial_indent=indent, subsequent_indent=indent + "    ",
                            break_on_hyphens=False))
        if root and paths:
            print(textwrap.fill(f"missing: {src.shortfall(root)}", width, initial_indent=indent,
                                subsequent_indent=indent + "    ", break_on_hyphens=False))
        hint = src.get_hint(root)
        if hint:
            print(textwrap.fill(f"to get it: {hint}", width, initial_indent=indent, subsequent_indent=indent + "    ",
                                break_on_hyphens=False))
    return 0


def _verify_dataset(name: str, root: str | None, workers: int) -> int:
    """Decode every image of data set `name` once; list the failures on stdout. Exit 1 when any file fails."""
    from .data.sources import get_source
    from .data.verify import verify

    source = get_source(name, "--verify")
    tty = sys.stderr.isatty()
    last = [0.0]

    def progress(split: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and (not tty or now - last[0] < 0.2):
            return
        last[0] = now
        filled = int(30 * done / max(total, 1))
        bar = f"{source.name} {split:<5} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}"
        print(("\r" + bar) if tty else bar, end="\n" if done >= total else "", file=sys.stderr, flush=True)

    checked, failures = verify(source, root, workers, progress)
    for message in failures:
        print(f"FAILED {message}")
    if failures:
        print(f"{source.name}: {len(failures)} failure(s) in {checked} images checked")
        return 1
    print(f"{source.name}: all {checked} images decode")
    return 0


def cmd_presets(args) -> int:
    from .errors import ConfigError
    from .runconfig import load_source, preset_names

    names = [n for n in preset_names() if all(term in n for term in args.terms)]
    if not names:
        raise ConfigError(f"no preset name contains {' and '.join(repr(t) for t in args.terms)} "
                          "(`vitcl presets` lists them all)")
    for name in names:
        if not args.published:
            print(name)
            continue
        pub = load_source(name).get("published") or {}
        values = ", ".join(f"{k} {v}" for k, v in (pub.get("values") or {}).items())
        cell = ", ".join(str(pub[k]) for k in ("source", "row", "column") if pub.get(k))
        print(f"{name}: {cell}: {values}" if values else f"{name}: -")
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitcl", description="Continual learning with vision transformers.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train a run: PRESET|FILE.yaml ... key.sub=value ...")
    r.add_argument("items", nargs="*", help=f"presets or YAML files, then overrides (default: {DEFAULT_PRESET})")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    r.set_defaults(fn=cmd_run)
    r = sub.add_parser("resume", help="continue a stopped run from its last checkpoint")
    r.add_argument("run_dir")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(fn=cmd_resume)
    r = sub.add_parser("eval", help="re-evaluate the saved task checkpoints of a run")
    r.add_argument("run_dir")
    r.set_defaults(fn=cmd_eval)
    r = sub.add_parser("analyze", help="locality analyses of a run's task checkpoints (non-locality, spectrum, "
                                       "attention heat maps)")
    r.add_argument("run_dir")
    r.add_argument("--analyses", default=None, help="comma list of nonlocality,spectrum,heatmaps (default: all)")
    r.add_argument("--samples", type=int, default=None, help="held-out batch size (default: eval.analysis_samples)")
    r.add_argument("--images", type=int, default=None, help="images in the heat maps (default: eval.analysis_images)")
    r.set_defaults(fn=cmd_analyze)
    r = sub.add_parser("report", help="Markdown table comparing runs; for sweep folders, the paper table")
    r.add_argument("run_dirs", nargs="+")
    r.add_argument("--format", choices=["markdown", "csv", "latex", "json"], default=None,
                   help="the paper table's format (default: markdown)")
    r.add_argument("--plot", metavar="FILE.png", default=None,
                   help="accuracy versus number of classes of every row, with a ±std band")
    r.set_defaults(fn=cmd_report)
    r = sub.add_parser("params", help="parameter count after each task, without training")
    r.add_argument("items", nargs="*")
    r.add_argument("--json", action="store_true")
    r.add_argument("--rounding", choices=["truncate", "round"], default="truncate",
                   help="the (M) column: truncated like DyTox's tables (default) or rounded like the Mask-RKR table")
    r.set_defaults(fn=cmd_params)
    r = sub.add_parser("bench", help="images/s of a training step and of inference, and peak memory, after 1, 10, "
                                     "50 tasks, from random images of the preset's shape")
    r.add_argument("items", nargs="+", help="PRESET|FILE.yaml ... key.sub=value ...")
    r.add_argument("--tasks", default="1,10,50", help="task counts (default: 1,10,50)")
    r.add_argument("--precision", default="fp32", help="fp32, bf16 or fp32,bf16 (default: fp32)")
    r.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                   help="torch.compile the method's compile_modules (--compile both: a row each)")
    r.add_argument("--batch", type=int, default=None, help="images per step (default: the preset's train.batch_size)")
    r.add_argument("--steps", type=int, default=10, help="timed steps per row (default: 10)")
    r.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    r.set_defaults(fn=cmd_bench)
    r = sub.add_parser("datasets", help="list data sources and whether their files are found")
    r.add_argument("--data-root", default=None, help="look only under this folder, as data.root does in a run")
    r.add_argument("--verify", metavar="NAME", default=None,
                   help="decode every image of data set NAME once and list the files that fail (exit 1 if any)")
    r.add_argument("--workers", type=int, default=2, help="decoding processes for --verify (default: 2)")
    r.set_defaults(fn=cmd_datasets)
    r = sub.add_parser("presets", help="list the preset configs")
    r.add_argument("terms", nargs="*", help="only the names that contain every one of these (dytox cifar100)")
    r.add_argument("--published", action="store_true", help="with the published cell each preset aims at")
    r.set_defaults(fn=cmd_presets)
    _add_sweep_parser(sub)
    return p


def _add_sweep_parser(sub) -> None:
    r = sub.add_parser("sweep", help="every combination of --grid values, for each PRESET, into one sweep folder")
    r.add_argument("items", nargs="*", help="presets (one table row each), then overrides for every run")
    r.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values; several --grid are crossed")
    r.add_argument("--out", default=None, help="the sweep folder (default: runs/sweep-PRESET-TIME)")
    r.add_argument("--resume", metavar="SWEEP_DIR", default=None, help="run what is missing or failed in a sweep")
    r.add_argument("--launcher", choices=["sequential", "local", "slurm"], default=None,
                   help="sequential (default): here, one after another; local: subprocesses; slurm: submitit jobs")
    r.add_argument("--gpus", default=None, help="local: one run per GPU at a time, e.g. 0,1,2,3")
    r.add_argument("--slots", type=int, default=None, help="local: N runs on the CPU at once")
    r.add_argument("--partition", default=None, help="slurm: the partition")
    r.add_argument("--account", default=None, help="slurm: the account")
    r.add_argument("--gpus-per-run", type=int, default=None, help="slurm: GPUs per run (torchrun when above 1)")
    r.add_argument("--timeout", type=int, default=None, help="slurm: minutes per job (default: 60)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress output from the runs")
    r.set_defaults(fn=cmd_sweep)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    _stopped_by.clear()
    previous = _install_stop_handlers() if args.fn in (cmd_run, cmd_resume, cmd_sweep) else {}
    try:
        return args.fn(args)
    except VitclError as exc:
        print(f"vitcl: error: {_error_text(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # before training started (or after it ended): nothing to keep
        print(f"vitcl: {_stop_name()}", file=sys.stderr)
        return _stop_code()
    except BrokenPipeError:  # the reader of stdout left (`vitcl presets | head`): quiet, as a tool killed by SIGPIPE
        _detach_stdout()
        return 128 + signal.SIGPIPE
    finally:
        if not _stopped_by:  # after a stop signal they stay ignored: a repeated Ctrl-C must not break the exit
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
