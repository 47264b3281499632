"""`vitcl sweep`: every combination of a grid of overrides, for one or more presets, into one sweep folder.

The sweep folder holds `sweep.yaml` (the presets, the overrides, the grid, the launcher, the machine, and each
run's folder name and state) and one ordinary run folder per combination, made by `vitcl run` itself: in this
process (sequential), as `python -m vitcl run` subprocesses (local: one per GPU or per CPU slot), or as Slurm jobs
through submitit (`torchrun` when a run asks for more than one GPU; requeued and resumed on preemption).
A run's state is read back from its folder, so `--resume` redoes only what has no complete results.json.
"""
from __future__ import annotations

import itertools
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import yaml

from .errors import ConfigError, VitclError

SWEEP_FILE = "sweep.yaml"
LAUNCHERS = ("sequential", "local", "slurm")
# grid keys whose values are repetitions of one experiment (aggregated in the report); any other grid key makes
# its own report row
REPEAT_KEYS = ("run.seed", "data.class_order", "data.class_order_seed")
ERROR_PREFIX = "vitcl: error: "

# runs one `vitcl` command line in this process: (exit code, the one-line error it printed or None)
InProcess = Callable[[list[str]], "tuple[int, str | None]"]


@dataclass
class SweepRun:
    name: str
    preset: str
    grid: dict[str, str]
    state: str = "pending"  # pending | done | failed | interrupted | submitted
    error: str | None = None
    machine: dict | None = None  # where a Slurm job ran (else the sweep's machine)

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.grid.items()]


@dataclass
class Sweep:
    folder: Path
    presets: list[str]
    overrides: list[str]
    grid: dict[str, list[str]]
    launcher: dict
    runs: list[SweepRun] = field(default_factory=list)
    machine: dict = field(default_factory=dict)

    def run_dir(self, run: SweepRun) -> Path:
        return self.folder / run.name

    def argv(self, run: SweepRun) -> list[str]:
        """The `vitcl run` arguments of one run (presets, overrides, grid values, its folder)."""
        return [run.preset, *self.overrides, *run.overrides(), f"run.name={run.name}",
                f"run.out_dir={self.folder}"]

    def save(self) -> None:
        doc = {"presets": self.presets, "overrides": self.overrides, "grid": self.grid, "launcher": self.launcher,
               "machine": self.machine,
               "runs": [{k: v for k, v in vars(r).items() if v is not None} for r in self.runs]}
        tmp = self.folder / (SWEEP_FILE + ".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
        tmp.replace(self.folder / SWEEP_FILE)


# ------------------------------------------------------------------------------------------------ the grid
def split_values(text: str) -> list[str]:
    """Comma-separated values, commas inside [...] or {...} kept (data.increment=[10,5],[5,5] is two values)."""
    values, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += c in "[{"
        depth -= c in "]}"
        if c == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_grid(items: list[str], overrides: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    fixed = {o.split("=", 1)[0].strip() for o in overrides}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid {item}: expected key.sub=value1,value2,...")
        if key in grid:
            raise ConfigError(f"--grid {key}: the key is given twice; list all its values in one --grid")
        if key in fixed:
            raise ConfigError(f"--grid {key}: the key is also a fixed override ({key}=...); give it in one place")
        if key in ("run.name", "run.out_dir"):
            raise ConfigError(f"--grid {key}: set by vitcl sweep for each run (the sweep folder is --out)")
        values = split_values(text)
        if not text.strip() or any(v == "" for v in values):
            raise ConfigError(f"--grid {key}: an empty value in {text!r}; expected key=value1,value2,...")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {key}: a value is listed twice in {text!r}")
        grid[key] = values
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _preset_stem(preset: str) -> str:
    return _slug(Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset)


def plan_runs(presets: list[str], grid: dict[str, list[str]]) -> list[SweepRun]:
    """One run per preset and combination of grid values, named after them (unique leaf names, else full keys)."""
    leaves = [k.rsplit(".", 1)[-1] for k in grid]
    labels = leaves if len(set(leaves)) == len(leaves) else list(grid)
    runs, seen = [], set()
    for preset in presets:
        for combo in itertools.product(*grid.values()):
            name = "_".join([_preset_stem(preset), *(f"{label}-{_slug(v)}" for label, v in zip(labels, combo))])
            if name in seen:
                raise ConfigError(f"{preset}: two runs of the sweep would share the folder {name}; "
                                  f"give each preset once and grid values that differ after replacing symbols")
            seen.add(name)
            runs.append(SweepRun(name, preset, dict(zip(grid, combo))))
    return runs


def validate_runs(sweep: Sweep) -> None:
    """Every combination's config is loaded and checked before anything runs (the first error stops all)."""
    from .runconfig import load_config

    for run in sweep.runs:
        try:
            load_config([run.preset], [*sweep.overrides, *run.overrides()])
        except ConfigError as exc:
            where = ", ".join(run.overrides()) or "no grid values"
            raise ConfigError(f"{exc} (in the sweep's run {run.preset} with {where})") from None


def machine_record() -> dict:
    """This machine, for the reproductions table: host, CPU, GPU (CUDA_VISIBLE_DEVICES-aware), torch."""
    record = {"hostname": socket.gethostname(), "cpu": _cpu_name(), "cpus": os.cpu_count()}
    try:
        import torch

        record["torch"] = str(torch.__version__)
        if torch.cuda.is_available():
            record["gpu"] = torch.cuda.get_device_name(0)
            record["gpus"] = torch.cuda.device_count()
    except ImportError:
        pass
    return record


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def new_sweep(presets: list[str], overrides: list[str], grid_items: list[str], out: str | None,
              launcher: dict) -> Sweep:
    if not presets:
        raise ConfigError("vitcl sweep: expected at least one PRESET (or --resume SWEEP_DIR)")
    for o in overrides:
        if o.split("=", 1)[0].strip() in ("run.name", "run.out_dir"):
            raise ConfigError(f"{o}: set by vitcl sweep for each run; choose the sweep folder with --out")
    grid = parse_grid(grid_items, overrides)
    folder = Path(out) if out else Path("runs") / (
        f"sweep-{'_'.join(_preset_stem(p) for p in presets)}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (folder / SWEEP_FILE).exists():
        raise VitclError(f"{folder}: a sweep already lives there; `vitcl sweep --resume {folder}` continues it")
    sweep = Sweep(folder, list(presets), list(overrides), grid, launcher, plan_runs(presets, grid))
    validate_runs(sweep)
    folder.mkdir(parents=True, exist_ok=True)
    sweep.machine = machine_record()
    sweep.save()
    return sweep


def load_sweep(folder: Path) -> Sweep:
    path = Path(folder) / SWEEP_FILE
    if not path.exists():
        raise VitclError(f"{path}: not found; expected a sweep folder made by `vitcl sweep`")
    try:
        doc = yaml.safe_load(path.read_text())
        runs = [SweepRun(**r) for r in doc["runs"]]
        return Sweep(Path(folder), doc["presets"], doc.get("overrides") or [], doc.get("grid") or {},
                     doc.get("launcher") or {"name": "sequential"}, runs, doc.get("machine") or {})
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise VitclError(f"{path}: corrupt sweep file ({exc.__class__.__name__}: {exc})") from None


def run_state(run_dir: Path) -> str:
    """done: results.json covers every task; resume: the folder has a config (vitcl resume continues it, or
    starts it over when it has no checkpoint yet); run: nothing there yet."""
    import json

    results = run_dir / "results.json"
    if results.exists():
        try:
            r = json.loads(results.read_text())
            if r.get("tasks_done") == r.get("num_tasks"):
                return "done"
        except (json.JSONDecodeError, AttributeError):
            pass
    return "resume" if (run_dir / "config.yaml").exists() else "run"


def command_for(sweep: Sweep, run: SweepRun) -> list[str]:
    """The `vitcl` arguments that bring a run to its end from what its folder holds."""
    if run_state(sweep.run_dir(run)) == "resume":
        return ["resume", str(sweep.run_dir(run))]
    return ["run", *sweep.argv(run)]


# ------------------------------------------------------------------------------------------------ launchers
def launch(sweep: Sweep, in_process: InProcess, quiet: bool = False, log: Callable[[str], None] | None = None,
           executor_cluster: str = "slurm") -> list[SweepRun]:
    """Run what is not done yet with the sweep's launcher; returns the failed runs. sweep.yaml is rewritten after
    every change of state, so an interrupted sweep resumes from what it says and what the run folders hold."""
    say = log or (lambda text: print(text, file=sys.stderr))
    todo = []
    for run in sweep.runs:
        if run_state(sweep.run_dir(run)) == "done":
            run.state, run.error = "done", None
        else:
            todo.append(run)
    sweep.save()
    done = len(sweep.runs) - len(todo)
    say(f"sweep {sweep.folder}: {len(sweep.runs)} runs, {done} done, {len(todo)} to run "
        f"({sweep.launcher['name']} launcher)")
    name = sweep.launcher["name"]
    try:
        if name == "sequential":
            _sequential(sweep, todo, in_process, quiet, say)
        elif name == "local":
            _local(sweep, todo, say)
        else:
            _slurm(sweep, todo, say, executor_cluster)
    except KeyboardInterrupt:
        for run in todo:
            if run.state in ("pending", "submitted"):
                run.state = "interrupted"
        sweep.save()
        say(f"sweep interrupted; `vitcl sweep --resume {sweep.folder}` runs what is missing")
        raise
    sweep.save()
    return [r for r in sweep.runs if r.state == "failed"]


def _finish(sweep: Sweep, run: SweepRun, rc: int, error: str | None, say) -> None:
    ok = rc == 0 and run_state(sweep.run_dir(run)) == "done"
    run.state = "done" if ok else "failed"
    run.error = None if ok else (error or f"exit code {rc}")
    sweep.save()
    say(f"{'done' if ok else 'FAILED'} {run.name}" + ("" if ok else f": {run.error}"))


def _sequential(sweep: Sweep, todo: list[SweepRun], in_process: InProcess, quiet: bool, say) -> None:
    for i, run in enumerate(todo):
        say(f"[{i + 1}/{len(todo)}] {run.name}")
        rc, error = in_process(command_for(sweep, run) + (["-q"] if quiet else []))
        _finish(sweep, run, rc, error, say)


def _child_env(gpu: str | None) -> dict:
    """The environment of a run subprocess: the vitcl this process imported first on the path."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def last_error_line(log_text: str) -> str | None:
    """The one-line error a `vitcl` command printed, else the last line of its output (a traceback's end)."""
    lines = [x for x in log_text.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith(ERROR_PREFIX)]
    if errors:
        return errors[-1][len(ERROR_PREFIX):]
    return lines[-1].strip() if lines else None


def _local(sweep: Sweep, todo: list[SweepRun], say) -> None:
    gpus = sweep.launcher.get("gpus")
    slots: list[str | None] = list(gpus) if gpus else [None] * int(sweep.launcher.get("slots") or 1)
    logs = sweep.folder / "logs"
    logs.mkdir(exist_ok=True)
    queue = list(todo)
    running: dict[int, tuple[SweepRun, subprocess.Popen, IO[str]]] = {}
    try:
        while queue or running:
            for slot, gpu in enumerate(slots):
                if slot in running or not queue:
                    continue
                run = queue.pop(0)
                log_file: IO[str] = (logs / f"{run.name}.log").open("w")
                cmd = [sys.executable, "-m", "vitcl", *command_for(sweep, run), "-q"]
                running[slot] = (run, subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                                       env=_child_env(gpu)), log_file)
                say(f"started {run.name}" + (f" on GPU {gpu}" if gpu is not None else "")
                    + f" (log: {logs / (run.name + '.log')})")
            for slot, (run, proc, log_file) in list(running.items()):
                if proc.poll() is None:
                    continue
                log_file.close()
                del running[slot]
                error = last_error_line((logs / f"{run.name}.log").read_text(errors="replace"))
                _finish(sweep, run, proc.returncode, error, say)
            time.sleep(0.2)
    finally:  # interrupted: the runs stop at their SIGTERM handler (their last checkpoint stays), then we go
        for _, proc, _ in running.values():
            if proc.poll() is None:
                proc.terminate()
        for _, proc, log_file in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log_file.close()


class SlurmRun:
    """One run as a submitit job. `__call__` runs it (or resumes it from its folder) in a subprocess: `torchrun`
    over gpus_per_run processes when that is above 1. On preemption or timeout submitit calls `checkpoint`, which
    stops the run (it keeps its last checkpoint) and requeues a job that goes on with `vitcl resume RUN_DIR`."""

    def __init__(self, argv: list[str], run_dir: str, gpus_per_run: int, resume: bool = False):
        self.argv, self.run_dir, self.gpus_per_run, self.resume = argv, run_dir, gpus_per_run, resume
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "_proc"}  # a process does not travel with the job

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state, _proc=None)

    def command(self) -> list[str]:
        resume = self.resume or (Path(self.run_dir) / "config.yaml").exists()
        args = ["resume", self.run_dir] if resume else ["run", *self.argv]
        if self.gpus_per_run > 1:
            return ["torchrun", "--standalone", f"--nproc_per_node={self.gpus_per_run}", "-m", "vitcl", *args, "-q"]
        return [sys.executable, "-m", "vitcl", *args, "-q"]

    def __call__(self) -> dict:
        self._proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=_child_env(None))
        output, _ = self._proc.communicate()
        sys.stdout.write(output)  # into the job's log
        return {"returncode": self._proc.returncode, "error": last_error_line(output), "machine": machine_record()}

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # vitcl's SIGTERM handler stops after the current step, checkpoints intact
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return DelayedSubmission(SlurmRun(self.argv, self.run_dir, self.gpus_per_run, resume=True))


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher slurm needs submitit: pip install 'vitcl[slurm]'") from None
    return submitit


def _slurm(sweep: Sweep, todo: list[SweepRun], say, cluster: str) -> None:
    submitit = import_submitit()
    opts = sweep.launcher
    gpus = int(opts.get("gpus_per_run") or 1)
    folder = str(sweep.folder / "slurm" / "%j")
    if cluster == "slurm":  # the Slurm executor itself: AutoExecutor needs pkg_resources, gone from setuptools
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(partition=opts.get("partition"), time=int(opts.get("timeout") or 60),
                                   gpus_per_node=gpus, ntasks_per_node=1, nodes=1, job_name="vitcl-sweep",
                                   cpus_per_task=int(opts.get("cpus_per_run") or 8),
                                   **({"account": opts["account"]} if opts.get("account") else {}))
    else:  # "debug": in this process, for tests
        executor = submitit.DebugExecutor(folder=folder)
    jobs = []
    for run in todo:
        job = executor.submit(SlurmRun(sweep.argv(run), str(sweep.run_dir(run)), gpus,
                                       resume=run_state(sweep.run_dir(run)) == "resume"))
        run.state = "submitted"
        jobs.append((run, job))
        say(f"submitted {run.name}: job {job.job_id}")
    sweep.save()
    for run, job in jobs:
        try:
            result = job.result()
            run.machine = result.get("machine")
            _finish(sweep, run, result["returncode"], result.get("error"), say)
        except Exception as exc:  # the job itself failed (node failure, cancelled): the run is failed, not the rest
            first = str(exc).strip().splitlines()
            _finish(sweep, run, 1, f"job {job.job_id}: {first[-1] if first else exc.__class__.__name__}", say)


# ------------------------------------------------------------------------------------------------ the report
def _row_label(preset: str, assignment: dict[str, str]) -> str:
    kept = [f"{k}={v}" for k, v in assignment.items() if k not in REPEAT_KEYS]
    return " ".join([preset, *kept])


def report_groups(paths: list[Path], say: Callable[[str], None] | None = None) -> list:
    """Table rows for sweep folders and run folders: a sweep's runs grouped by preset and by the grid values
    other than seeds and class orders; a lone run folder by its presets and overrides. Runs without complete
    results are left out (and named through `say`)."""
    from .eval.aggregate import Group
    from .eval.report import load_results

    groups: dict[tuple[str, str], Group] = {}

    def add(label: str, preset: str, results: dict) -> None:
        groups.setdefault((label, preset), Group(label, preset, [])).results.append(results)

    for path in map(Path, paths):
        if (path / SWEEP_FILE).exists():
            sweep = load_sweep(path)
            for run in sweep.runs:
                run_dir = sweep.run_dir(run)
                if run_state(run_dir) != "done":
                    if say:
                        say(f"left out {run_dir}: no complete results ({run.state})")
                    continue
                add(_row_label(run.preset, run.grid), run.preset, load_results(run_dir))
            continue
        results = load_results(path)
        spec = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").exists() else {}
        preset = " ".join(spec.get("sources") or [path.name])
        overrides = dict(o.split("=", 1) for o in spec.get("overrides") or [] if "=" in o)
        add(_row_label(preset, {k: v for k, v in overrides.items() if not k.startswith("run.")}), preset, results)
    if not groups:
        raise VitclError(f"{', '.join(map(str, paths))}: no run with complete results to report")
    return list(groups.values())


def report(paths: list[str | Path]):
    """The paper table of sweep folders and run folders (vitcl.eval.aggregate.Table: .rows, .to_markdown(),
    .to_csv(), .to_latex(), .to_json())."""
    from .eval.aggregate import aggregate

    return aggregate(report_groups([Path(p) for p in paths]))
