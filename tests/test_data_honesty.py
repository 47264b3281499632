"""Nothing silent, nothing lost: a given data.root is the only place looked in, every run records what it read,
inconsistent ImageFolder trees are refused before any work, and a corrupt image is one line whatever the worker
count (issue 10, items 1, 2 and 7). From the user's side: the CLI in a subprocess, data in the real formats."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from datafiles import make_idx_dataset, make_image_tree, make_jpeg_tree
from helpers import TINY, run_cli
from vitcl.data.sources import base as source_base
from vitcl.data.sources import get_source
from vitcl.errors import DataError

FASHION = ["finetune/fashion-mnist-b0inc2", *TINY, "train.epochs=1"]
# a two-task run over a two-class ImageFolder tree, 8x8 images
FOLDER = ["finetune/digits-b0inc2", *TINY, "train.epochs=1", "data.dataset=imagefolder", "data.image_size=8",
          "data.class_order=null", "data.initial_increment=1", "data.increment=1"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A complete Fashion-MNIST on the search path ($VITCL_DATA), and no system folder or user cache."""
    make_idx_dataset(tmp_path / "elsewhere" / "fashion-mnist", per_class=(3, 2))
    monkeypatch.setenv("VITCL_DATA", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(source_base, "SYSTEM_DIR", tmp_path / "system")
    return tmp_path


def _one_line_error(proc, *parts: str, started: bool = False) -> str:
    """The error line of a failed command; with started, after the lines a run prints once it has begun."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and (started or len(lines) == 1), proc.stderr
    err = lines[-1]
    assert err.startswith("vitcl: error: ") and sum(line.startswith("vitcl: error") for line in lines) == 1
    for part in parts:
        assert part in err, (part, err)
    return err


# ---------------------------------------------------------------------------------------------- item 1
def test_given_root_never_falls_back_to_the_search_path(env):
    runs = env / "runs"
    proc = run_cli("run", "-q", *FASHION, f"run.out_dir={runs}", f"data.root={env / 'no' / 'such'}")
    _one_line_error(proc, f"data.root={env / 'no' / 'such'}", "does not exist", "data.download=true",
                    f"into {env / 'no' / 'such' / 'fashion-mnist'}")
    partial = env / "partial" / "fashion-mnist"
    make_idx_dataset(partial, per_class=(1, 1))
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    proc = run_cli("run", "-q", *FASHION, f"run.out_dir={runs}", f"data.root={env / 'partial'}")
    err = _one_line_error(proc, f"{partial} lacks t10k-labels-idx1-ubyte[.gz]", "data.download=true")
    assert f"leave data.root unset to read the copy at {env / 'elsewhere' / 'fashion-mnist'}" in err
    assert not runs.exists()  # refused before a run folder is made
    # vitcl datasets --data-root looks only there too
    out = run_cli("datasets", "--data-root", str(env / "partial"), check=True).stdout
    block = out.split("\nfashion-mnist", 1)[1].split("\n\n", 1)[0]
    assert "MISSING" in block and "t10k-labels-idx1-ubyte[.gz]" in block and "elsewhere" not in block
    out = run_cli("datasets", check=True).stdout
    block = out.split("\nfashion-mnist", 1)[1].split("\n\n", 1)[0]
    assert "found" in block and str(env / "elsewhere" / "fashion-mnist") in block


def test_run_records_the_files_it_read_and_report_shows_them(env):
    runs = env / "runs"
    run_cli("run", "-q", *FASHION, f"run.out_dir={runs}", "run.name=found", check=True)
    record = json.loads((runs / "found" / "data.json").read_text())
    (d,) = record["datasets"]
    folder = env / "elsewhere" / "fashion-mnist"
    assert d["dataset"] == "fashion-mnist" and d["root"] is None and d["folder"] == str(folder)
    assert sorted(Path(f["path"]).name for f in d["files"]) == sorted(p.name for p in folder.iterdir())
    for f in d["files"]:
        data = Path(f["path"]).read_bytes()
        assert f["bytes"] == len(data) and f["md5"] == hashlib.md5(data).hexdigest()
    assert d["splits"]["train"] == {"images": 30, "used": 30} and d["splits"]["test"]["images"] == 20
    # a given root is what is read and recorded
    make_idx_dataset(env / "mine" / "fashion-mnist", per_class=(2, 1), seed=3)
    run_cli("run", "-q", *FASHION, f"run.out_dir={runs}", "run.name=given", f"data.root={env / 'mine'}", check=True)
    d = json.loads((runs / "given" / "data.json").read_text())["datasets"][0]
    assert d["root"] == str(env / "mine") and d["folder"] == str(env / "mine" / "fashion-mnist")
    # vitcl report: a data column; a run made before data.json shows "-"
    shutil.copytree(runs / "given", runs / "older")
    (runs / "older" / "data.json").unlink()
    table = run_cli("report", str(runs / "found"), str(runs / "given"), str(runs / "older"), check=True).stdout
    header, _, found, given, older = table.splitlines()
    assert "| data |" in header
    assert f"| fashion-mnist (…/{env.name}/elsewhere/fashion-mnist) |" in found
    assert f"| fashion-mnist (…/{env.name}/mine/fashion-mnist) |" in given
    assert older.split(" | ")[2] == "-"


def test_embedded_digits_record_package_and_version(tmp_path):
    import sklearn

    run_cli("run", "-q", "finetune/digits-b0inc2", *TINY, "train.epochs=1", f"run.out_dir={tmp_path}", "run.name=d",
            check=True)
    d = json.loads((tmp_path / "d" / "data.json").read_text())["datasets"][0]
    assert d["embedded"] == {"package": "scikit-learn", "version": sklearn.__version__} and d["files"] == []
    assert d["splits"]["train"]["used"] == 240
    table = run_cli("report", str(tmp_path / "d"), check=True).stdout
    assert f"| digits (scikit-learn {sklearn.__version__}) |" in table


def test_listing_checksum_follows_names_and_sizes(tmp_path):
    root = make_image_tree(tmp_path / "set", classes=("a", "b"), per_class=(2, 1))
    src = get_source("imagefolder")
    first = src.load(str(root), train=True).provenance
    assert first["images"] == 4 and first["classes"] == 2 and first["tree"] == str(root / "train")
    assert src.load(str(root), train=True).provenance["listing_sha256"] == first["listing_sha256"]
    with open(root / "train" / "a" / "0.png", "ab") as f:
        f.write(b"\0")  # same name, another size
    assert src.load(str(root), train=True).provenance["listing_sha256"] != first["listing_sha256"]


# ---------------------------------------------------------------------------------------------- item 2
def test_empty_class_folder_is_refused_before_any_work(tmp_path):
    root = make_image_tree(tmp_path / "set", classes=("a", "b"), per_class=(2, 1))
    (root / "train" / "c").mkdir()
    (root / "test" / "c").mkdir()
    proc = run_cli("run", "-q", *FOLDER, f"data.root={root}", f"run.out_dir={tmp_path / 'runs'}")
    _one_line_error(proc, f"{root / 'train' / 'c'}: empty class folder", ".jpg")
    assert not (tmp_path / "runs").exists()


def test_class_in_one_split_only_is_refused(tmp_path):
    root = make_image_tree(tmp_path / "set", classes=("a", "b"), per_class=(2, 1))
    shutil.rmtree(root / "test" / "b")
    proc = run_cli("run", "-q", *FOLDER, f"data.root={root}", f"run.out_dir={tmp_path / 'runs'}")
    _one_line_error(proc, f"{root / 'test'}: no folders for classes ['b'] of {root / 'train'}")
    (root / "test" / "b").mkdir()  # a test folder that is there but empty
    with pytest.raises(DataError, match=f"{root / 'test' / 'b'}: empty class folder"):
        get_source("imagefolder").load(str(root), train=False)
    shutil.rmtree(root / "test" / "b")
    make_image_tree(tmp_path / "other", classes=("a", "b", "z"), per_class=(0, 1))
    shutil.copytree(tmp_path / "other" / "test" / "z", root / "test" / "z")
    shutil.copytree(tmp_path / "other" / "test" / "b", root / "test" / "b")
    with pytest.raises(DataError, match=r"class folders \['z'\] are not in"):
        get_source("imagefolder").load(str(root), train=False)


def test_split_lists_naming_missing_files_or_classes_are_refused(tmp_path):
    root = make_image_tree(tmp_path / "set", classes=("a", "b"), per_class=(2, 1))
    (root / "train.txt").write_text("train/a/0.png 0\ntrain/a/gone.png 0\ntrain/b/0.png 1\ntrain/b/1.png 1\n")
    (root / "test.txt").write_text("test/a/0.png 0\ntest/b/0.png 1\n")
    proc = run_cli("run", "-q", *FOLDER, f"data.root={root}", f"run.out_dir={tmp_path / 'runs'}")
    _one_line_error(proc, f"{root / 'train.txt'}:2: image train/a/gone.png not found under {root}")
    assert not (tmp_path / "runs").exists()
    src = get_source("imagefolder")
    (root / "train.txt").write_text("train/a/0.png 0\ntrain/b/0.png 1\n")
    (root / "test.txt").write_text("test/a/0.png 0\n")
    with pytest.raises(DataError, match=r"test.txt: no test images of labels \[1\] that train.txt has"):
        src.load(str(root), train=False)
    (root / "test.txt").write_text("test/a/0.png 0\ntest/b/0.png 2\n")
    with pytest.raises(DataError, match=r"that train.txt has; labels \[2\] have no images in train.txt"):
        get_source("imagefolder").load(str(root), train=False)
    dtd = get_source("dtd")  # 47 classes: a train list that names two of them leaves 45 empty
    with pytest.raises(DataError, match=r"train.txt: no images of labels \[2, 3, 4, 5, 6\] \(expected every label"):
        dtd.load(str(root), train=True)


# ---------------------------------------------------------------------------------------------- item 7
def test_corrupt_jpeg_in_a_worker_is_one_line_naming_the_file(tmp_path):
    root = make_jpeg_tree(tmp_path / "set", broken="train/b/1.jpg")
    for workers in (2, 0):
        proc = run_cli("run", "-q", *FOLDER, f"data.root={root}", f"data.num_workers={workers}",
                       f"run.out_dir={tmp_path / 'runs'}", f"run.name=w{workers}")
        _one_line_error(proc, f"{root / 'train' / 'b' / '1.jpg'}: cannot decode the image", started=True)


def test_verify_lists_the_files_that_fail(tmp_path):
    root = make_jpeg_tree(tmp_path / "set", per_class=(3, 2), broken="test/a/1.jpg")
    proc = run_cli("datasets", "--verify", "imagefolder", "--data-root", str(root))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert failed == [f"FAILED {root / 'test' / 'a' / '1.jpg'}: cannot decode the image (Truncated File Read)"]
    assert "1 failure(s) in 10 images checked" in proc.stdout
    assert "imagefolder train" in proc.stderr and "6/6" in proc.stderr and "4/4" in proc.stderr  # progress
    (root / "test" / "a" / "1.jpg").unlink()
    proc = run_cli("datasets", "--verify", "imagefolder", "--data-root", str(root))
    assert proc.returncode == 0 and "all 9 images decode" in proc.stdout, proc.stdout + proc.stderr


def test_verify_of_idx_files_and_of_missing_data(tmp_path):
    make_idx_dataset(tmp_path / "kmnist", per_class=(2, 1))
    proc = run_cli("datasets", "--verify", "kmnist", "--data-root", str(tmp_path))
    assert proc.returncode == 0 and "all 30 images decode" in proc.stdout, proc.stderr
    cut = tmp_path / "kmnist" / "t10k-images-idx3-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[:-8])
    proc = run_cli("datasets", "--verify", "kmnist", "--data-root", str(tmp_path))
    assert proc.returncode == 1 and f"FAILED {cut}: cannot read the IDX file" in proc.stdout, proc.stdout
    proc = run_cli("datasets", "--verify", "mnist", "--data-root", str(tmp_path / "nothing"))
    _one_line_error(proc, "mnist: files not found under data.root=", "does not exist")
    proc = run_cli("datasets", "--verify", "nosuch")
    _one_line_error(proc, "--verify: unknown dataset 'nosuch'")
