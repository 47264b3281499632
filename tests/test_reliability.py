"""Nothing silent, nothing lost: one-line errors instead of tracebacks, stopping on Ctrl-C and SIGTERM, metrics
that a resume leaves exactly as an uninterrupted run writes them, and a resume on another number of processes."""
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers import SRC, TINY, run_cli, without_timing
from helpers import metrics_records as metrics
from vitcl import cli
from vitcl.engine import checkpoint

SMALL = ["replay/digits-b0inc2", *TINY, "data.increment=5"]  # two tasks
ONE_THREAD = "run.threads=1"  # the same float sums in this process and in a subprocess


def one_line(proc_or_text) -> str:
    text = proc_or_text if isinstance(proc_or_text, str) else proc_or_text.stderr
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def after_start(text: str) -> str:
    """The one line after the two that a run prints when it starts (its folder; method, data and device)."""
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("run folder: "), text
    return lines[2]


def results(run_dir) -> dict:
    return without_timing(json.loads((run_dir / "results.json").read_text()))


# ------------------------------------------------------------------ one-line errors
def test_a_yaml_file_that_is_not_utf8_is_one_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train: {epochs: 1}  # réglé\n".encode("latin-1"))
    proc = run_cli("run", str(bad))
    assert proc.returncode == 2
    line = one_line(proc)
    assert str(bad) in line and "not UTF-8" in line


def test_a_run_config_that_is_not_utf8_is_one_line(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_bytes(b"run: {name: \xe9t\xe9}\n")
    proc = run_cli("resume", str(run_dir))
    assert proc.returncode == 2
    assert str(run_dir / "config.yaml") in one_line(proc) and "not UTF-8" in proc.stderr


@pytest.mark.parametrize("device,ok", [("tpu", False), ("cuda:x", False), ("CPU", False), ("cpu", True),
                                       ("auto", True), ("cuda", True), ("cuda:3", True), ("mps", True)])
def test_run_device_is_checked_with_the_config(device, ok):
    from vitcl.errors import ConfigError
    from vitcl.runconfig import load_config

    if ok:
        load_config(["replay/digits-b0inc2"], [f"run.device={device}"])
        return
    with pytest.raises(ConfigError, match="^run.device: expected auto, cpu, cuda, cuda:N or mps"):
        load_config(["replay/digits-b0inc2"], [f"run.device={device}"])


def test_run_device_tpu_from_the_cli_is_one_line():
    proc = run_cli("run", "run.device=tpu")
    assert proc.returncode == 2 and "run.device" in one_line(proc) and "'tpu'" in proc.stderr


def test_out_dir_that_is_a_file_is_one_line(tmp_path):
    afile = tmp_path / "runs"
    afile.write_text("not a folder")
    proc = run_cli("run", *SMALL, f"run.out_dir={afile}", "run.name=x", "-q")
    assert proc.returncode == 2
    line = one_line(proc)
    assert f"{afile}: cannot make the run folder x there (a file, not a folder)" in line


def test_out_dir_that_is_read_only_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes")
        proc = run_cli("run", *SMALL, f"run.out_dir={ro}", "run.name=x", "-q")
        assert proc.returncode == 2
        line = one_line(proc)
        assert f"{ro}: cannot make the run folder x there" in line and "permission denied" in line
    finally:
        ro.chmod(0o755)


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                             capsys):
    calls = {"n": 0}
    original = torch.save

    def full_after_two(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # last.pt after epoch 1 and 2 of task 0 are written, then task_0.pt finds no room
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_after_two)
    code = cli.main(["run", *SMALL, f"run.out_dir={tmp_path}", "run.name=x", "-q"])
    monkeypatch.undo()
    assert code == 2
    line = after_start(capsys.readouterr().err)
    last = tmp_path / "x" / "checkpoints" / "last.pt"
    assert line.startswith("vitcl: error: ") and "task_0.pt: writing the checkpoint failed (the disk is full)" in line
    assert f"the previous checkpoint {last} is intact" in line
    ckpt = torch.load(last, weights_only=False)
    assert (ckpt["progress"]["task"], ckpt["progress"]["epoch"]) == (0, 2)
    assert not list((tmp_path / "x" / "checkpoints").glob("*.tmp"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    run_cli("run", *SMALL, "train.epochs=1", f"run.out_dir={out}", "run.name=x", "-q", check=True)
    return out / "x"


def edited_copy(finished_run, tmp_path, section: str, key: str, value):
    """A copy of the finished run whose config.yaml has section.key set to value."""
    shutil.copytree(finished_run, tmp_path / "x")
    path = tmp_path / "x" / "config.yaml"
    doc = yaml.safe_load(path.read_text())
    doc[section][key] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return tmp_path / "x"


def test_resume_after_the_config_was_edited_names_the_key(tmp_path, finished_run):
    edited_copy(finished_run, tmp_path, "model", "embed_dim", 32)
    proc = run_cli("resume", str(tmp_path / "x"), "-q")
    assert proc.returncode == 2
    line = one_line(proc)
    assert "model.embed_dim (was 16, now 32) changed" in line
    assert "resume needs the config the run started with" in line


def test_resume_after_a_harmless_edit_says_so(tmp_path, finished_run):
    edited_copy(finished_run, tmp_path, "eval", "batch_size", 32)
    proc = run_cli("resume", str(tmp_path / "x"), "-q", check=True)
    assert "note: eval.batch_size (was 64, now 32) changed" in proc.stderr


# ------------------------------------------------------------------ Ctrl-C and SIGTERM
def _popen(*args):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vitcl", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signals,code,name", [
    ([signal.SIGINT], 130, "interrupted"),
    ([signal.SIGINT, signal.SIGINT, signal.SIGINT], 130, "interrupted"),  # a repeated Ctrl-C: still 130
    ([signal.SIGTERM], 143, "terminated (SIGTERM)"),
])
def test_a_stop_during_start_up_is_one_line(tmp_path, signals, code, name):
    fifo = tmp_path / "slow.yaml"  # reading it blocks until the test writes: the command is in its start-up
    os.mkfifo(fifo)
    proc = _popen("run", str(fifo), f"run.out_dir={tmp_path}")
    deadline = time.time() + 60
    while True:  # opening the writing end succeeds once vitcl has opened the file to read it
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
            time.sleep(0.01)
    try:
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.01)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(fd)
    assert proc.returncode == code, err
    assert one_line(err) == f"vitcl: {name}"


def test_a_reader_that_leaves_early_is_quiet_and_exits_141():
    # `vitcl presets | head -1`: the pipe is closed before vitcl writes; no traceback, SIGPIPE's exit status
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "vitcl", "presets"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == 128 + signal.SIGPIPE and err == ""


def test_a_closed_stand_in_for_stdout_exits_141_too(monkeypatch):
    class Closed(io.StringIO):  # no file descriptor to point at /dev/null, as in a notebook
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert cli.main(["presets"]) == 128 + signal.SIGPIPE


def test_sigterm_during_training_keeps_a_checkpoint_says_how_to_resume_and_exits_143(tmp_path):
    proc = _popen("run", *SMALL, "train.epochs=3", f"run.out_dir={tmp_path}", "run.name=x", "-q")
    last = tmp_path / "x" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert after_start(err) == f"terminated (SIGTERM); `vitcl resume {tmp_path / 'x'}` continues from the last checkpoint"
    assert checkpoint.load(last)["progress"]["task"] < 2
    assert not list((tmp_path / "x" / "checkpoints").glob("*.tmp"))


def test_a_signal_during_a_checkpoint_write_waits_for_the_rename(tmp_path, monkeypatch, capsys):
    original = torch.save
    calls = {"n": 0}

    def signalled(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGTERM)  # the handler runs now, in the middle of the write
        return original(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", signalled)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = cli.main(["run", *SMALL, f"run.out_dir={tmp_path}", "run.name=x", "-q"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert code == 143
    assert "terminated (SIGTERM); `vitcl resume" in capsys.readouterr().err
    ckpt = checkpoint.load(tmp_path / "x" / "checkpoints" / "last.pt")
    assert ckpt["progress"]["epoch"] == 2  # the write that the signal met was finished, not dropped
    assert not list((tmp_path / "x" / "checkpoints").glob("*.tmp"))


# ------------------------------------------------------------------ metrics.jsonl after a resume; processes
def _stopped_between_metrics_and_checkpoint(run_dir, monkeypatch, capsys):
    """A run stopped after the task_end record of task 0 was appended, before task_0.pt was written."""
    original = checkpoint.save_atomic

    def stop_at_task_checkpoint(obj, path):
        if path.name == "task_0.pt":
            raise KeyboardInterrupt
        return original(obj, path)

    monkeypatch.setattr(checkpoint, "save_atomic", stop_at_task_checkpoint)
    threads = torch.get_num_threads()
    code = cli.main(["run", *SMALL, "train.eval_every=1", ONE_THREAD, f"run.out_dir={run_dir.parent}",
                     f"run.name={run_dir.name}", "-q"])
    torch.set_num_threads(threads)
    monkeypatch.undo()
    capsys.readouterr()
    assert code == 130
    assert [m["kind"] for m in metrics(run_dir)] == ["periodic", "task_end"]


def test_resume_makes_metrics_equal_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    threads = torch.get_num_threads()
    assert cli.main(["run", *SMALL, "train.eval_every=1", ONE_THREAD, f"run.out_dir={tmp_path}", "run.name=full",
                     "-q"]) == 0
    torch.set_num_threads(threads)
    _stopped_between_metrics_and_checkpoint(tmp_path / "cut", monkeypatch, capsys)
    resumed = run_cli("resume", str(tmp_path / "cut"), "-q", check=True)
    assert "note:" not in resumed.stderr  # the same config and number of processes: nothing to say
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    assert [m["kind"] for m in metrics(tmp_path / "full")] == ["periodic", "task_end", "periodic", "task_end"]
    assert results(tmp_path / "cut") == results(tmp_path / "full")


def test_a_resume_on_another_number_of_processes_says_so_and_records_it(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "cut"
    _stopped_between_metrics_and_checkpoint(run_dir, monkeypatch, capsys)
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["world_size"] == 1
    ckpt["world_size"] = 2  # as if the run had started under torchrun --nproc_per_node 2
    torch.save(ckpt, last)
    proc = run_cli("resume", str(run_dir), "-q", check=True)
    assert "note: the run so far used 2 processes and goes on with 1 process; recorded in metrics.jsonl" \
        in proc.stderr
    records = metrics(run_dir)
    assert [m["kind"] for m in records] == ["periodic", "resume", "task_end", "periodic", "task_end"]
    assert records[1] == {"kind": "resume", "task": 0, "phase": 0, "epoch": 2, "previous_world_size": 2,
                          "world_size": 1}


def test_running_out_of_gpu_memory_is_one_line_with_what_to_change(tmp_path, monkeypatch, capsys):
    from vitcl.engine.trainer import Trainer

    epoch = Trainer.train_epoch
    calls = {"n": 0}

    def out_of_memory_in_task_1(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.12 GiB is free.")
        return epoch(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_epoch", out_of_memory_in_task_1)
    code = cli.main(["run", *SMALL, f"run.out_dir={tmp_path}", "run.name=x", "-q"])
    assert code == 2
    line = after_start(capsys.readouterr().err)
    run = tmp_path / "x"
    assert line.startswith("vitcl: error: cpu: CUDA out of memory; ") and "Tried to allocate" not in line
    assert f"the last checkpoint in {run / 'checkpoints'} is intact" in line and "eval.fit_batch" in line
    assert line.endswith(f"`vitcl resume {run}`") and (run / "checkpoints" / "task_0.pt").is_file()
