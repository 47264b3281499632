"""Shared by the benchmark scripts: run vitcl presets, read their results, rewrite one section of BENCHMARKS.md."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def device_name() -> str:
    """The accelerator's name for a section title ("NVIDIA H100 80GB HBM3"), or "CPU"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def run_preset(preset: str, out_dir: Path, name: str, overrides: list[str]) -> tuple[dict, float]:
    """Train one preset with `vitcl run`; returns its results.json and the wall time in seconds."""
    cmd = [sys.executable, "-m", "vitcl", "run", preset, *overrides, f"run.out_dir={out_dir}", f"run.name={name}",
           "run.progress=false"]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run(cmd, check=True, env=env)
    return json.loads((out_dir / name / "results.json").read_text()), time.perf_counter() - t0


def update_section(title: str, body: str) -> None:
    """Replace (or append) the `## title` section of BENCHMARKS.md. A paragraph of the old section that begins
    with "Reading" (what the figures mean, written by hand) and all after it stay, below the new body."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\nFigures measured with the scripts in `benchmarks/`.\n"
    head = f"## {title}\n"
    section = head + "\n" + body.strip() + "\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        old = text[start:nxt if nxt >= 0 else len(text)]
        reading = old.find("\n\nReading")
        if reading >= 0:
            section = section.rstrip("\n") + old[reading:].rstrip("\n") + "\n"
        text = text[:start] + section + (text[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    BENCHMARKS.write_text(text)


def fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"
