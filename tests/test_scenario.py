"""Scenarios: class orders (explicit, seeded, named), base + increment splits, invalid splits, sequences of
datasets, per-class subsetting, and the data presets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datafiles import colour_of, make_idx_dataset, make_image_tree
from vitcl.config import DataConfig, build
from vitcl.data.build import build_scenario
from vitcl.data.orders import NAMED_ORDERS, resolve_class_order, seeded_permutation
from vitcl.data.scenario import make_increments
from vitcl.data.sources import base as source_base
from vitcl.errors import ConfigError
from vitcl.runconfig import PRESET_DIR, load_config


@pytest.fixture(autouse=True)
def isolated_places(tmp_path, monkeypatch):
    monkeypatch.setattr(source_base, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VITCL_DATA", raising=False)


def data(**kw) -> DataConfig:
    return build(DataConfig, kw, "data")


def check_tasks(sc):
    """Every task owns a contiguous label range and exactly the samples of its classes."""
    for task in sc:
        assert list(task.labels) == list(range(task.offset, task.end))
        assert task.classes == tuple(sc.class_order[task.offset:task.end])
        for images, labels, idx in ((sc.train, sc.train_labels, task.train_idx),
                                    (sc.test, sc.test_labels, task.test_idx)):
            in_task = torch.isin(images.targets, torch.tensor(task.classes))
            assert torch.equal(idx, in_task.nonzero().flatten())
            assert labels[idx].min() >= task.offset and labels[idx].max() < task.end
    assert sum(len(t.train_idx) for t in sc) == len(sc.train)


# ---------------------------------------------------------------------------------------------- splits
def test_b0_equal_increments():
    sc = build_scenario(data(dataset="digits", increment=2))
    assert sc.increments == [2] * 5 and len(sc) == 5 and sc.class_order == list(range(10))
    assert sc.describe().startswith("5 tasks (B2-2)")
    check_tasks(sc)
    assert sc.seen_classes(2) == 6 and sc.task_of_label.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_base_classes_then_increment():
    sc = build_scenario(data(dataset="digits", initial_increment=4, increment=3))
    assert sc.increments == [4, 3, 3]
    check_tasks(sc)
    assert build_scenario(data(dataset="digits", initial_increment=10, increment=5)).increments == [10]  # joint


def test_list_increments():
    assert build_scenario(data(dataset="digits", increment=[3, 3, 4])).increments == [3, 3, 4]
    sc = build_scenario(data(dataset="digits", initial_increment=4, increment=[1, 5]))
    assert sc.increments == [4, 1, 5]
    check_tasks(sc)


@pytest.mark.parametrize("kw, key", [
    (dict(increment=3), "data.increment"),  # 10 classes do not split into tasks of 3
    (dict(initial_increment=4, increment=4), "data.increment"),
    (dict(initial_increment=12, increment=2), "data.initial_increment"),
    (dict(increment=11), "data.increment"),
    (dict(increment=[3, 3]), "data.increment"),  # does not cover the 10 classes
    (dict(initial_increment=5, increment=[3, 3]), "data.increment"),
])
def test_invalid_increments_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        build_scenario(data(dataset="digits", **kw))


def test_make_increments_direct():
    assert make_increments(100, 50, 5) == [50] + [5] * 10
    assert make_increments(100, 0, 10) == [10] * 10
    assert make_increments(1000, 100, 100) == [100] * 10


def test_validation_rejects_non_positive_increments():
    with pytest.raises(ConfigError, match="data.increment"):
        load_config(["replay/digits-b0inc2"], ["data.increment=0"])
    with pytest.raises(ConfigError, match="data.increment"):
        load_config(["replay/digits-b0inc2"], ["data.increment=[5,-5,10]"])


# ---------------------------------------------------------------------------------------------- class orders
def test_explicit_class_order():
    order = [9, 3, 0, 1, 2, 4, 5, 6, 7, 8]
    sc = build_scenario(data(dataset="digits", class_order=order, increment=5))
    assert sc.class_order == order and sc[0].classes == (9, 3, 0, 1, 2)
    check_tasks(sc)
    # a sample's label is the position of its class in the order
    assert torch.equal(sc.train_labels, torch.tensor([order.index(c) for c in sc.train.targets.tolist()]))


@pytest.mark.parametrize("order, words", [
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 8], "appear more than once"),
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 10], "out of range 0..9"),
    ([0, 1, 2, 3, 4, 5, 6, 7, 8], "missing [9]"),
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3], "appear more than once"),
    ([-1, 1, 2, 3, 4, 5, 6, 7, 8, 9], "out of range"),
])
def test_invalid_class_orders(order, words):
    with pytest.raises(ConfigError, match="^data.class_order:") as err:
        build_scenario(data(dataset="digits", class_order=order))
    assert words in str(err.value)


def test_random_order_is_seeded():
    a = build_scenario(data(dataset="digits", class_order="random", class_order_seed=3)).class_order
    b = build_scenario(data(dataset="digits", class_order="random", class_order_seed=3)).class_order
    c = build_scenario(data(dataset="digits", class_order="random", class_order_seed=4)).class_order
    assert a == b != c and sorted(a) == list(range(10))
    assert a == np.random.RandomState(3).permutation(10).tolist()


def test_named_orders_check_class_count_and_names():
    with pytest.raises(ConfigError, match="'cifar100-order1' orders 100 classes but the dataset has 10"):
        build_scenario(data(dataset="digits", class_order="cifar100-order1"))
    with pytest.raises(ConfigError, match="unknown order 'cifar100-order4'.*cifar100-order1"):
        build_scenario(data(dataset="digits", class_order="cifar100-order4"))


PUBLISHED_PREFIXES = {
    "cifar100-order1": [87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86],
    "cifar100-order2": [58, 30, 93, 69, 21, 77, 3, 78, 12, 71, 65, 40, 16, 49, 89, 46, 24, 66, 19, 41],
    "cifar100-order3": [71, 54, 45, 32, 4, 8, 48, 66, 1, 91, 28, 82, 29, 22, 80, 27, 86, 23, 37, 47],
    "imagenet100-order1": [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38],
    "imagenet1000-order1": [54, 7, 894, 512, 126, 337, 988, 11, 284, 493, 133, 783, 192, 979, 622, 215, 240],
}
PUBLISHED_SUFFIXES = {
    "cifar100-order1": [98, 13, 99, 7, 34, 55, 54, 26, 35, 39],
    "cifar100-order2": [52, 74, 8, 20, 1, 92, 87, 23, 64, 61],
    "cifar100-order3": [5, 15, 10, 78, 67, 44, 59, 85, 43, 11],
    "imagenet100-order1": [93, 39, 67, 29, 49, 57, 33],
    "imagenet1000-order1": [124, 304, 329, 349, 295, 95, 451, 285, 225, 945, 697, 417],
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PREFIXES))
def test_named_order_is_the_published_permutation(name):
    n, order = NAMED_ORDERS[name]
    assert sorted(order) == list(range(n))
    assert order[:len(PUBLISHED_PREFIXES[name])] == PUBLISHED_PREFIXES[name]
    assert order[-len(PUBLISHED_SUFFIXES[name]):] == PUBLISHED_SUFFIXES[name]
    assert resolve_class_order(name, n, 0) == order


def test_imagenet100_order_is_numpy_seed_1993():
    assert NAMED_ORDERS["imagenet100-order1"][1] == seeded_permutation(100, 1993)
    np.random.seed(1993)
    assert NAMED_ORDERS["imagenet100-order1"][1] == np.random.permutation(100).tolist()
    # ... and not CIFAR-100's order 1 (docs/methods/dytox.md#class-orders)
    assert NAMED_ORDERS["cifar100-order1"][1] != seeded_permutation(100, 1993)


# ---------------------------------------------------------------------------------------------- sequences, subsets
def test_dataset_sequence_shifts_labels(tmp_path):
    written = make_idx_dataset(tmp_path / "fashion-mnist", per_class=(3, 2))
    sc = build_scenario(data(datasets=["digits", "fashion-mnist"], root=str(tmp_path), setting="task-il"))
    assert len(sc) == 2 and sc.increments == [10, 10] and sc.names == ["digits", "fashion-mnist"]
    assert sc.setting == "task-il"
    assert sc.train.images.shape[1:] == (1, 28, 28)  # the larger size and channel count of the sources
    n_digits = len(sc[0].train_idx)
    assert len(sc[1].train_idx) == 30 and len(sc[1].test_idx) == 20
    second = sc.train_labels[sc[1].train_idx]
    assert torch.equal(second, torch.from_numpy(written["train"][1].astype(np.int64)) + 10)
    assert torch.equal(sc.train.images[n_digits:, 0], torch.from_numpy(written["train"][0]))
    assert sc.class_names[10] == "fashion-mnist:T-shirt/top" and sc.class_names[0] == "digits:0"
    check_tasks(sc)
    with pytest.raises(ConfigError, match="data.class_order: not used with data.datasets"):
        build_scenario(data(datasets=["digits", "fashion-mnist"], root=str(tmp_path), class_order="random"))
    with pytest.raises(ConfigError, match=r"data.datasets\[1\]: unknown dataset 'nope'"):
        build_scenario(data(datasets=["digits", "nope"]))


def test_dataset_sequence_with_a_lazy_source(tmp_path):
    make_image_tree(tmp_path / "tree", classes=("a", "b"), per_class=(2, 1))
    make_idx_dataset(tmp_path / "tree" / "mnist", per_class=(1, 1))  # data.root/mnist for the IDX source
    sc = build_scenario(data(datasets=["mnist", "imagefolder"], root=str(tmp_path / "tree"), image_size=16,
                             channels=3))
    assert sc.increments == [10, 2] and len(sc.train) == 14 and not sc.train.in_memory
    lazy = sc.train.read(12)  # the imagefolder's third image, decoded (the engine resizes it)
    assert lazy.shape[0] == 3 and sc.train_labels[12].item() == 11
    assert sc.train.read(0).shape == (3, 16, 16)  # the in-memory part, already fitted


def test_train_per_class_keeps_the_first_n_of_each_class():
    full = build_scenario(data(dataset="digits"))
    sc = build_scenario(data(dataset="digits", train_per_class=5, test_per_class=2))
    assert torch.equal(sc.train.targets.bincount(), torch.full((10,), 5))
    assert torch.equal(sc.test.targets.bincount(), torch.full((10,), 2))
    for c in range(10):
        first = full.train.images[full.train.targets == c][:5]
        assert torch.equal(sc.train.images[sc.train.targets == c], first)
    check_tasks(sc)


def test_lazy_set_subsetting(tmp_path):
    make_image_tree(tmp_path / "tree", classes=("a", "b", "c"), per_class=(4, 1))
    sc = build_scenario(data(dataset="imagefolder", root=str(tmp_path / "tree"), train_per_class=2, increment=1,
                             class_order=[2, 0, 1]))
    assert len(sc.train) == 6 and sc.train.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert sc.increments == [1, 1, 1] and sc[0].classes == (2,)
    assert sc.train.read(2)[:, 0, 0].tolist() == list(colour_of(1, 0))  # b/0.png
    check_tasks(sc)


# ---------------------------------------------------------------------------------------------- presets
DATA_PRESETS = {
    "cifar100-b0inc10": [10] * 10, "cifar100-b0inc5": [5] * 20, "cifar100-b0inc2": [2] * 50,
    "cifar100-joint": [100], "cifar100-b10inc10": [10] * 10, "cifar100-b5inc5": [5] * 20,
    "cifar100-b50inc10": [50] + [10] * 5, "cifar100-b50inc5": [50] + [5] * 10,
    "imagenet100-b0inc10": [10] * 10, "imagenet100-b10inc10": [10] * 10, "imagenet100-b50inc10": [50] + [10] * 5,
    "imagenet100-b50inc5": [50] + [5] * 10, "imagenet1000-b0inc100": [100] * 10,
    "fashion-mnist-b0inc2": [2] * 5, "digits-b0inc2": [2] * 5,
}


@pytest.mark.parametrize("name", sorted(DATA_PRESETS))
def test_data_presets_split_as_named(name):
    assert (PRESET_DIR / "data" / f"{name}.yaml").is_file()
    cfg, _ = load_config(["base/small-vit", f"data/{name}"])
    sc = build_scenario(cfg.data, shapes_only=True)  # no files needed
    assert sc.increments == DATA_PRESETS[name]
    if name.startswith("cifar100"):
        assert cfg.data.class_order == "cifar100-order1" and cfg.data.augment.crop_padding == 4
        assert cfg.data.augment.mean == [0.5071, 0.4867, 0.4408]
    if name.startswith("imagenet"):
        assert cfg.data.class_order == f"{name.split('-')[0]}-order1" and cfg.data.image_size == 224


@pytest.mark.parametrize("preset", ["finetune/fashion-mnist-b0inc2", "replay/fashion-mnist-b0inc2",
                                    "joint/fashion-mnist-b0inc2"])
def test_fashion_mnist_method_presets_resolve(preset):
    cfg, _ = load_config([preset])
    assert cfg.data.dataset == "fashion-mnist" and cfg.data.image_size == 32 and cfg.model.patch_size == 8
    assert cfg.method.name == preset.split("/")[0] and cfg.data.train_per_class
