"""Sources on tiny files written in the real formats: IDX, CIFAR pickles, ImageFolder trees; lookup, download,
and the error for every missing or corrupt file."""
from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from datafiles import (
    colour_of,
    dump,
    make_cifar10,
    make_cifar100,
    make_idx_dataset,
    make_image_tree,
    write_idx,
    write_png,
)
from vitcl.cli import main
from vitcl.data.sources import SOURCES, Remote, get_source, md5sum
from vitcl.data.sources import base as source_base
from vitcl.data.sources.cifar import read_pickle
from vitcl.data.sources.idx import read_idx
from vitcl.errors import DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated_places(tmp_path, monkeypatch):
    """No system folder, user cache or VITCL_DATA leaks into a test (the real Fashion-MNIST test opts back in)."""
    monkeypatch.setattr(source_base, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VITCL_DATA", raising=False)


# ---------------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [True, False])
def test_idx_reads_gz_and_raw(tmp_path, gz):
    written = make_idx_dataset(tmp_path / "mnist", gz=gz)
    src = get_source("mnist")
    for split, train in (("train", True), ("test", False)):
        images, labels = written[split]
        s = src.load(str(tmp_path), train=train)
        assert s.images.shape == (len(labels), 1, 28, 28) and s.images.dtype == torch.uint8
        assert torch.equal(s.images[:, 0], torch.from_numpy(images))
        assert torch.equal(s.targets, torch.from_numpy(labels.astype(np.int64)))
    assert src.locate(str(tmp_path)) == tmp_path / "mnist"


def test_idx_found_in_root_itself_and_torchvision_layout(tmp_path):
    make_idx_dataset(tmp_path / "direct", per_class=(1, 1))
    assert get_source("kmnist").locate(str(tmp_path / "direct")) == tmp_path / "direct"
    make_idx_dataset(tmp_path / "tv" / "FashionMNIST" / "raw", per_class=(1, 1), gz=False)
    src = get_source("fashion-mnist")
    assert src.locate(str(tmp_path / "tv")) == tmp_path / "tv" / "FashionMNIST" / "raw"
    assert src.load(str(tmp_path / "tv"), train=True).class_names[0] == "T-shirt/top"


def test_idx_lookup_order_root_before_system(tmp_path, monkeypatch):
    make_idx_dataset(tmp_path / "system" / "mnist", per_class=(1, 1))
    make_idx_dataset(tmp_path / "root" / "mnist", per_class=(2, 1))
    src = get_source("mnist")
    assert src.locate(None) == tmp_path / "system" / "mnist"
    assert src.locate(str(tmp_path / "root")) == tmp_path / "root" / "mnist"
    monkeypatch.setenv("VITCL_DATA", str(tmp_path / "root"))
    assert src.locate(None) == tmp_path / "root" / "mnist"


def _idx_error(path: Path) -> str:
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert str(path) in str(err.value)
    return str(err.value)


def test_idx_rejects_truncated_and_corrupt_files(tmp_path):
    images = np.zeros((4, 28, 28), np.uint8)
    raw = write_idx(tmp_path / "ok-idx3-ubyte", images, gz=False).read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(raw[:-10])
    assert "truncated" in _idx_error(cut) and "3136" in _idx_error(cut)
    extra = tmp_path / "extra"
    extra.write_bytes(raw + b"\0")
    assert "trailing" in _idx_error(extra)
    short_header = tmp_path / "header"
    short_header.write_bytes(raw[:9])
    assert "header" in _idx_error(short_header)
    magic = tmp_path / "magic"
    magic.write_bytes(b"\x01\x02" + raw[2:])
    assert "not an IDX file" in _idx_error(magic)
    dtype = tmp_path / "dtype"
    dtype.write_bytes(raw[:2] + b"\x07" + raw[3:])
    assert "data type" in _idx_error(dtype)
    gz_cut = tmp_path / "cut.gz"
    gz_cut.write_bytes(gzip.compress(raw)[:-30])
    assert "gzip" in _idx_error(gz_cut)
    gz_bad = tmp_path / "bad.gz"
    gz_bad.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    _idx_error(gz_bad)


def test_idx_dataset_level_checks_name_the_file(tmp_path):
    folder = tmp_path / "mnist"
    make_idx_dataset(folder, per_class=(2, 1))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(3, dtype=np.uint8))  # 3 labels for 10 images
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: 3 labels for the 10 images"):
        get_source("mnist").load(str(tmp_path), train=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.full(10, 12, np.uint8))
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.9"):
        get_source("mnist").load(str(tmp_path), train=False)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros(10, np.uint8))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: expected uint8 images of shape \(N, H, W\)"):
        get_source("mnist").load(str(tmp_path), train=False)


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        get_source("fashion-mnist").load(None, train=True)
    msg = str(err.value)
    assert "\n" not in msg
    for part in (str(tmp_path / "system" / "fashion-mnist"), str(tmp_path / "cache" / "vitcl" / "fashion-mnist"),
                 "apt-get install dataset-fashion-mnist", "data.download=true", "train-images-idx3-ubyte"):
        assert part in msg, part
    with pytest.raises(DataError) as err:
        get_source("fashion-mnist").load(str(tmp_path / "data"), train=True)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "system") not in msg  # a given root is the only place looked in
    assert f"data.root={tmp_path / 'data'}" in msg and f"{tmp_path / 'data'} does not exist" in msg
    assert "data.download=true to fetch it from http://fashion-mnist" in msg
    assert f"into {tmp_path / 'data' / 'fashion-mnist'}" in msg
    with pytest.raises(DataError, match="cifar100: files not found.*cifar-100-python/train.*data.download=true"):
        get_source("cifar100").load(None, train=True)


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists() and
                    not (FASHION / "train-images-idx3-ubyte").exists(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_loads(monkeypatch):
    monkeypatch.setattr(source_base, "SYSTEM_DIR", Path("/usr/share/datasets"))
    src = get_source("fashion-mnist")
    train, test = src.load(None, train=True), src.load(None, train=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape[1:] == (1, 28, 28) and test.images.shape[1:] == (1, 28, 28)
    assert torch.equal(train.targets.bincount(), torch.full((10,), 6000))
    assert train.class_names[9] == "Ankle boot"
    mean = train.images[:5000].float().div(255).mean().item()
    assert abs(mean - src.mean[0]) < 0.02


# ---------------------------------------------------------------------------------------------- download
def _local_remotes(tmp_path: Path, files: dict[str, bytes], wrong: str | None = None) -> tuple[Remote, ...]:
    served = tmp_path / "served"
    served.mkdir(exist_ok=True)
    remotes = []
    for name, data in files.items():
        (served / name).write_bytes(data)
        md5 = "0" * 32 if name == wrong else md5sum(served / name)
        remotes.append(Remote((served / name).as_uri(), name, md5))
    return tuple(remotes)


def test_download_checks_md5_and_loads(tmp_path):
    make_idx_dataset(tmp_path / "origin", per_class=(2, 1))
    src = get_source("mnist")
    src.remotes = _local_remotes(tmp_path, {p.name: p.read_bytes() for p in (tmp_path / "origin").iterdir()})
    with pytest.raises(DataError, match="files not found"):
        src.load(str(tmp_path / "data"), train=True)  # download is off by default
    s = src.load(str(tmp_path / "data"), train=True, download=True)
    assert len(s) == 20
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(r.filename for r in src.remotes)
    # without a root the download goes to the user cache, which is then searched
    s = src.load(None, train=False, download=True)
    assert len(s) == 10 and src.locate(None) == tmp_path / "cache" / "vitcl" / "mnist"


def test_download_with_wrong_md5_leaves_nothing(tmp_path):
    make_idx_dataset(tmp_path / "origin", per_class=(1, 1))
    src = get_source("mnist")
    files = {p.name: p.read_bytes() for p in sorted((tmp_path / "origin").iterdir())}
    src.remotes = _local_remotes(tmp_path, files, wrong=sorted(files)[0])
    with pytest.raises(DataError, match="md5") as err:
        src.load(str(tmp_path / "data"), train=True, download=True)
    assert sorted(files)[0] in str(err.value)
    assert not (tmp_path / "data" / "mnist").exists()
    assert list((tmp_path / "data").iterdir()) == []  # no partial file, no lock file


def test_concurrent_downloads_take_turns(tmp_path):
    make_cifar100(tmp_path / "build", n_train=100, n_test=100)
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-100-python", arcname="cifar-100-python")
    remotes = _local_remotes(tmp_path, {archive.name: archive.read_bytes()})
    results, errors = [], []

    def fetch():
        src = get_source("cifar100")
        src.remotes = remotes
        try:
            results.append(len(src.load(str(tmp_path / "data"), train=False, download=True)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [100, 100, 100]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar100"]


def test_download_failure_names_the_url(tmp_path):
    src = get_source("kmnist")
    src.remotes = (Remote((tmp_path / "nowhere.gz").as_uri(), "nowhere.gz", "0" * 32),)
    with pytest.raises(DataError, match="download of nowhere.gz failed"):
        src.require(str(tmp_path / "data"), download=True)
    assert not (tmp_path / "data" / "kmnist").exists()
    assert not list((tmp_path / "data").glob("**/*.part"))


def test_download_uses_mirror_when_first_fails(tmp_path):
    make_idx_dataset(tmp_path / "origin", per_class=(1, 1))
    src = get_source("mnist")
    good = _local_remotes(tmp_path, {p.name: p.read_bytes() for p in (tmp_path / "origin").iterdir()})
    src.remotes = tuple(Remote((tmp_path / "gone" / r.filename).as_uri(), r.filename, r.md5, (r.url,)) for r in good)
    assert len(src.load(str(tmp_path / "data"), train=True, download=True)) == 10


def test_cifar_download_unpacks_tarball(tmp_path):
    make_cifar100(tmp_path / "build", n_train=100, n_test=100)
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-100-python", arcname="cifar-100-python")
    src = get_source("cifar100")
    src.remotes = _local_remotes(tmp_path, {archive.name: archive.read_bytes()})
    s = src.load(str(tmp_path / "data"), train=True, download=True)
    assert len(s) == 100 and (tmp_path / "data" / "cifar100" / "cifar-100-python" / "meta").is_file()


# ---------------------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_pickles(tmp_path, bytes_keys):
    make_cifar10(tmp_path / "cifar10", per_batch=10, bytes_keys=bytes_keys)
    src = get_source("cifar10")
    train, test = src.load(str(tmp_path), train=True), src.load(str(tmp_path), train=False)
    assert train.images.shape == (50, 3, 32, 32) and len(test) == 10
    assert train.class_names[0] == "airplane" and train.class_names[9] == "truck"
    # rows are the red, green and blue planes in turn
    assert train.images[3, :, 0, 0].tolist() == [3, 103, 203]
    assert train.targets[:3].tolist() == [0, 1, 2] and train.targets[10:13].tolist() == [1, 2, 3]


def test_cifar_torchvision_layout_and_folder_itself(tmp_path):
    make_cifar10(tmp_path, per_batch=2)  # root/cifar-10-batches-py, as torchvision keeps it
    assert len(get_source("cifar10").load(str(tmp_path), train=True)) == 10
    assert len(get_source("cifar10").load(str(tmp_path / "cifar-10-batches-py"), train=False)) == 2


def test_cifar100_fine_labels_and_names(tmp_path):
    make_cifar100(tmp_path / "cifar100")
    src = get_source("cifar100")
    train = src.load(str(tmp_path), train=True)
    assert len(train) == 200 and train.targets.max().item() == 99
    assert train.num_classes == 100 and train.class_names[42] == "fine42"
    assert src.mean == (0.5071, 0.4867, 0.4408) and src.std == (0.2675, 0.2565, 0.2761)


def test_cifar_corrupt_files_are_named(tmp_path):
    base = make_cifar100(tmp_path / "cifar100", n_train=10, n_test=10)
    good = (base / "test").read_bytes()
    (base / "test").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cifar-100-python/test: not a readable CIFAR pickle \(truncated\)"):
        get_source("cifar100").load(str(tmp_path), train=False)
    dump({"data": np.zeros((2, 3072), np.uint8)}, base / "test")
    with pytest.raises(DataError, match="test: no 'fine_labels' entry"):
        get_source("cifar100").load(str(tmp_path), train=False)
    dump({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}, base / "test")
    with pytest.raises(DataError, match="expected 'data' as uint8 N x 3072"):
        get_source("cifar100").load(str(tmp_path), train=False)
    dump({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100]}, base / "test")
    with pytest.raises(DataError, match=r"'fine_labels' must lie in 0\.\.99"):
        get_source("cifar100").load(str(tmp_path), train=False)
    dump([1, 2], base / "test")
    with pytest.raises(DataError, match="expected a pickled dict"):
        get_source("cifar100").load(str(tmp_path), train=False)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps({"data": _Evil()}))
    with pytest.raises(DataError, match="unexpected object"):
        read_pickle(path)


# ---------------------------------------------------------------------------------------------- ImageFolder
def test_imagefolder_tree_is_lazy_and_decodes_rgb(tmp_path):
    make_image_tree(tmp_path / "set", classes=("owl", "cat", "dog"), test_dir="val")
    write_png(tmp_path / "set" / "train" / "cat" / "grey.png", (77, 0, 0), mode="L")
    (tmp_path / "set" / "train" / "cat" / "notes.txt").write_text("not an image")
    src = get_source("imagefolder")
    train = src.load(str(tmp_path / "set"), train=True)
    assert not train.in_memory and train.class_names == ["cat", "dog", "owl"]  # sorted folder order
    assert len(train) == 10 and train.targets.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    img = train.read(1)  # cat/1.png; "cat" is the second class written, label 1 there
    assert img.shape == (3, 5, 6) and img.dtype == torch.uint8
    assert img[:, 0, 0].tolist() == list(colour_of(1, 1))
    assert train.read(3)[:, 0, 0].tolist() == [77, 77, 77]  # grey.png, converted to RGB
    test = src.load(str(tmp_path / "set"), train=False)
    assert len(test) == 6 and src.count_classes(str(tmp_path / "set")) == 3
    # the reader pickles (DataLoader workers under spawn/forkserver), also through a subset
    sub = train.subset(torch.tensor([8, 1]))
    clone = pickle.loads(pickle.dumps(sub.read))
    assert torch.equal(clone(1), train.read(1)) and torch.equal(clone(0), train.read(8))


@pytest.mark.parametrize("relative_to", ["dataset", "split"])
def test_imagefolder_split_lists(tmp_path, relative_to):
    root = tmp_path / "imagenet100"
    make_image_tree(root, classes=("n01", "n02", "n03"), test_dir="val")
    for split, list_name in (("train", "train_100.txt"), ("val", "val_100.txt")):
        lines = ["# path label", ""]
        for label, cls in ((2, "n01"), (0, "n02"), (1, "n03")):  # list labels need not follow folder order
            for p in sorted((root / split / cls).iterdir()):
                rel = p.relative_to(root if relative_to == "dataset" else root / split)
                lines.append(f"{rel.as_posix()} {label}")
        (root / list_name).write_text("\n".join(lines) + "\n")
    src = get_source("imagenet100")
    src.num_classes = 3
    train = src.load(str(tmp_path), train=True)
    assert train.class_names == ["n02", "n03", "n01"]
    assert train.targets.tolist() == [2, 2, 2, 0, 0, 0, 1, 1, 1]
    assert train.read(0)[:, 0, 0].tolist() == list(colour_of(0, 0))  # n01/0.png
    test = src.load(str(tmp_path), train=False)
    assert test.targets.tolist() == [2, 2, 0, 0, 1, 1] and test.class_names == train.class_names


def test_imagefolder_errors_name_the_file(tmp_path):
    root = tmp_path / "set"
    make_image_tree(root, classes=("a", "b"), per_class=(1, 1))
    (root / "train.txt").write_text("train/a/0.png 0\ntrain/b/0.png\n")
    (root / "test.txt").write_text("test/a/0.png 0\n")
    src = get_source("imagefolder")
    with pytest.raises(DataError, match=r"train.txt:2: expected 'relative/path label'"):
        src.load(str(root), train=True)
    (root / "train.txt").write_text("train/a/0.png 0\ntrain/b/9.png 1\n")
    with pytest.raises(DataError, match=r"train.txt:2: image train/b/9.png not found under"):
        src.load(str(root), train=True)
    (root / "train.txt").write_text("nope/a/0.png 0\n")
    with pytest.raises(DataError, match=r"train.txt:1: image nope/a/0.png not found"):
        src.load(str(root), train=True)
    dtd = get_source("dtd")
    with pytest.raises(DataError, match=r"train.txt:1: label 50 is out of range 0\.\.46"):
        (root / "train.txt").write_text("train/a/0.png 50\n")
        dtd.load(str(root), train=True)
    for f in ("train.txt", "test.txt"):
        (root / f).unlink()
    with pytest.raises(DataError, match=r"2 class folders, expected 47 for dtd"):
        dtd.load(str(root), train=True)
    write_png(root / "test" / "zebra" / "0.png", (1, 2, 3))
    with pytest.raises(DataError, match=r"class folders \['zebra'\] are not in"):
        src.load(str(root), train=False)
    (root / "train" / "a" / "0.png").write_bytes(b"\x89PNG broken")
    train = src.load(str(root), train=True)
    with pytest.raises(DataError, match=r"train/a/0.png: cannot decode the image"):
        train.read(0)


def test_imagefolder_missing(tmp_path):
    with pytest.raises(DataError, match="data.root must name the folder"):
        get_source("imagefolder").load(None, train=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="does not hold a dataset in ImageFolder layout"):
        get_source("imagefolder").load(str(tmp_path / "empty"), train=True)
    with pytest.raises(DataError, match="imagenet1000: files not found.*image-net.org"):
        get_source("imagenet").load(str(tmp_path), train=True)


def test_registry_names():
    names = set(SOURCES.names())
    assert {"digits", "mnist", "fashion-mnist", "kmnist", "cifar10", "cifar100", "imagefolder", "imagenet100",
            "imagenet1000", "imagenet", "dtd", "gtsrb", "svhn", "ucf101", "flowers"} <= names
    assert get_source("imagenet").name == "imagenet1000"
    counts = {"dtd": 47, "gtsrb": 43, "svhn": 10, "ucf101": 101, "flowers": 102, "imagenet100": 100}
    assert {n: get_source(n).num_classes for n in counts} == counts


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_datasets_lists_every_source(tmp_path, capsys):
    make_idx_dataset(tmp_path / "kmnist", per_class=(1, 1))
    assert main(["datasets", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in SOURCES.names():
        if get_source(name).name == name:
            assert f"\n{name}" in out, name
    block = out.split("\nkmnist", 1)[1].split("\n\n", 1)[0]
    assert "found" in block and str(tmp_path / "kmnist") in block
    block = out.split("\nmnist", 1)[1].split("\n\n", 1)[0]
    assert "MISSING" in block and str(tmp_path / "mnist") in block and "data.download=true" in block
    assert "imagenet1000 (imagenet)" in out


def test_cli_run_with_missing_data_is_one_line_exit_2(tmp_path, capsys):
    code = main(["run", "-q", "finetune/fashion-mnist-b0inc2", f"run.out_dir={tmp_path / 'runs'}",
                 f"data.root={tmp_path / 'data'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("vitcl: error: fashion-mnist: files not found") and "apt-get install" in err
    assert not (tmp_path / "runs").exists()  # nothing written before the data is found
