"""The pretrained-ViT benchmarks as APER releases them (data/sources/pilot.py), read from tiny ImageFolder trees
built here, their data configs, and what `vitcl datasets` says about them."""
import numpy as np
import pytest
import torch
from PIL import Image

from vitcl.cli import main
from vitcl.data.build import build_scenario
from vitcl.data.orders import seeded_permutation
from vitcl.data.sources import SOURCES, get_source, pilot
from vitcl.errors import DataError
from vitcl.runconfig import load_config

BENCHMARKS = {"imagenet-r": 200, "imagenet-a": 200, "cub200": 200, "objectnet": 200, "omnibenchmark": 300,
              "vtab": 50}
CONFIGS = {"imagenet-r": 5, "imagenet-a": 20, "cub200": 10, "objectnet": 10, "omnibenchmark": 30, "vtab": 10}


def make_tree(folder, classes, train=2, test=1, size=(12, 10)):
    """folder/train/<class>/*.png and folder/test/<class>/*.png; pixel values encode (class, split, index)."""
    for split, n in (("train", train), ("test", test)):
        for c, name in enumerate(classes):
            d = folder / split / name
            d.mkdir(parents=True)
            for i in range(n):
                value = 40 * (c + 1) + 10 * i + (5 if split == "test" else 0)
                Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(d / f"img{i}.png")


def test_registered_with_class_counts_and_provenance_text():
    for name, n in BENCHMARKS.items():
        src = get_source(name)
        assert src.num_classes == n and src.image_size == 224 and src.channels == 3
        assert src.origin and "md5" in src.how_to_get and "LAMDA-CL/RevisitingCIL#5" in src.how_to_get
    assert SOURCES.get("cub", "data.dataset") is pilot.CUB200  # PILOT's folder name, also a name
    assert "730aa3fb9c7d2ec0b6381c6b23040681" in get_source("imagenet-r").how_to_get


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_reads_a_tiny_tree_in_sorted_folder_order(tmp_path, name):
    classes = ["n02", "n01", "n10"]
    folder = tmp_path / ("vtab-cil/vtab" if name == "vtab" else name)  # vtab: PILOT's nested folder
    make_tree(folder, classes)
    src = get_source(name)
    src.num_classes = 3  # the class-count check as a parameter: this tree has 3 classes
    train, test = src.load(str(tmp_path), train=True), src.load(str(tmp_path), train=False)
    assert train.class_names == test.class_names == sorted(classes)
    assert train.targets.tolist() == [0, 0, 1, 1, 2, 2] and test.targets.tolist() == [0, 1, 2]
    # label k is the k-th folder in sorted order (torchvision's ImageFolder): n02, made first, is label 1
    img = train.read(2)
    assert img.shape == (3, 10, 12) and int(img[0, 0, 0]) == 40 * (classes.index("n02") + 1)
    assert int(train.read(5)[0, 0, 0]) == 40 * (classes.index("n10") + 1) + 10
    assert int(test.read(0)[0, 0, 0]) == 40 * (classes.index("n01") + 1) + 5
    assert train.provenance["classes"] == 3 and train.provenance["layout"] == "folders"


def test_wrong_class_count_is_a_one_line_error(tmp_path):
    make_tree(tmp_path / "imagenet-r", ["a", "b", "c"])
    with pytest.raises(DataError, match=r"3 class folders, expected 200 for imagenet-r") as err:
        get_source("imagenet-r").load(str(tmp_path), train=True)
    assert "\n" not in str(err.value)


def test_missing_tree_names_the_download_links(tmp_path):
    with pytest.raises(DataError) as err:
        get_source("omnibenchmark").load(str(tmp_path), train=True)
    msg = str(err.value)
    assert "drive.google.com/file/d/1AbCP3zBMtv_TDXJypOCnOgX8hJmvJm3u" in msg and "\n" not in msg
    assert "f1c30808a707f9197c6c811ea52e5cbb" in msg


def test_data_configs_load_with_pilot_split_transforms_and_order():
    for name, inc in CONFIGS.items():
        cfg, _ = load_config([f"data/{name}-224-b0inc{inc}"])
        d = cfg.data
        assert (d.dataset, d.image_size, d.increment, d.initial_increment) == (name, 224, inc, 0)
        assert (d.class_order, d.class_order_seed, d.test_crop_pct, d.test_interpolation) == \
            ("random", 1993, 0.875, "bicubic")
        a = d.augment
        assert (a.crop, a.random_resized_scale, a.crop_interpolation, a.hflip) == \
            ("random-resized", [0.05, 1.0], "bilinear", True)
        assert (a.mean, a.std) == ([0.0] * 3, [1.0] * 3)
        assert BENCHMARKS[name] % inc == 0
    cifar, _ = load_config(["data/cifar100-224-b0inc5"])
    assert cifar.data.augment.crop_interpolation == "bilinear" and cifar.data.augment.random_resized_scale == [0.05, 1]


def test_scenario_from_a_data_config_uses_pilots_seeded_order(tmp_path, monkeypatch):
    classes = [f"c{i}" for i in range(4)]
    make_tree(tmp_path / "cub", classes)  # PILOT's folder name for CUB
    monkeypatch.setattr(pilot.CUB200, "num_classes", 4)
    cfg, _ = load_config(["data/cub200-224-b0inc10"], [f"data.root={tmp_path}", "data.increment=2",
                                                        "data.num_workers=0"])
    sc = build_scenario(cfg.data)
    order = seeded_permutation(4, 1993)
    assert sc.class_order == order == np.random.RandomState(1993).permutation(4).tolist()
    assert sc.increments == [2, 2]
    assert sc.class_names == [classes[c] for c in order]
    assert torch.equal(torch.bincount(sc.train.targets), torch.full((4,), 2))


def test_vitcl_datasets_lists_them_with_where_they_come_from(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in BENCHMARKS:
        assert f"\n{name}" in out
    assert "Hendrycks" in out and "RESISC45" in out and "a9c37bde6105a2516c900b0c33a437c1" in out
