"""A run killed (SIGKILL) at random points several times, resumed after each kill, ends with the results.json
and metrics.jsonl of an uninterrupted run: the same records, in the same order, with the same numbers, except the
fields that measure the machine (wall time, images/s, peak memory)."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import torch

from helpers import SRC, TINY, run_cli, without_timing
from helpers import metrics_records as records

ARGS = ["replay/digits-b0inc2", *TINY, "train.eval_every=1"]  # 5 tasks of 2 epochs, a periodic record per epoch
KILLS = 3


def _wait_for(path, proc):
    deadline = time.time() + 120
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)


def _mtime(path):
    return path.stat().st_mtime_ns if path.exists() else None


def test_random_kills_and_resumes_end_like_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    # the uninterrupted run, timed from its first checkpoint to its last task's: the span the kills are drawn from
    full = subprocess.Popen([sys.executable, "-m", "vitcl", "run", *ARGS, f"run.out_dir={tmp_path}", "run.name=full",
                             "-q"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "full" / "checkpoints" / "last.pt", full)
    t0 = time.perf_counter()
    _wait_for(tmp_path / "full" / "checkpoints" / "task_4.pt", full)
    span = time.perf_counter() - t0
    assert full.wait() == 0, full.stderr.read() if full.stderr else ""

    rng = random.Random(20261201)
    cut = tmp_path / "cut"
    last = cut / "checkpoints" / "last.pt"
    stages = []  # (whether the kill met a running process, the checkpoint it left: task, phase, epoch)
    for _ in range(KILLS):
        cmd = ["resume", str(cut)] if (cut / "config.yaml").exists() else \
            ["run", *ARGS, f"run.out_dir={tmp_path}", "run.name=cut"]
        proc = subprocess.Popen([sys.executable, "-m", "vitcl", *cmd, "-q"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # each attempt gets past its start-up to a new checkpoint, then dies at a random point of what follows:
        # in training, in an evaluation or memory update, or in a write
        before, deadline = _mtime(last), time.time() + 120
        while _mtime(last) == before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4) * span)
        running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        progress = torch.load(last, weights_only=False)["progress"]
        stages.append((running, (progress["task"], progress["phase"], progress["epoch"])))
    assert sum(running for running, _ in stages) >= KILLS - 1, f"the run ended before it could be killed: {stages}"
    run_cli("resume", str(cut), "-q", check=True)

    assert records(cut) == records(tmp_path / "full"), stages
    full_results = json.loads((tmp_path / "full" / "results.json").read_text())
    cut_results = json.loads((cut / "results.json").read_text())
    assert without_timing(cut_results) == without_timing(full_results), stages
    a = torch.load(tmp_path / "full" / "checkpoints" / "task_4.pt", weights_only=False)["method"]["model"]
    b = torch.load(cut / "checkpoints" / "task_4.pt", weights_only=False)["method"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
