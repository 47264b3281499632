"""From the data config to a Scenario: load sources, bring images to one shape, order and split classes."""
from __future__ import annotations

import torch

from ..config import DataConfig
from ..errors import ConfigError
from .dataset import ConcatReader, ImageSet, fit_images, per_class_head
from .orders import check_order_name, resolve_class_order
from .scenario import Scenario, check_class_order, make_increments
from .sources import Source, get_source


def check_without_files(cfg: DataConfig) -> None:
    """What of a data config can be checked before any file is read: the data set names, a named class order
    and, where the source's class count is fixed (not counted from folders), the class order and the split."""
    if cfg.datasets:
        for i, name in enumerate(cfg.datasets):
            get_source(name, f"data.datasets[{i}]")
        return
    source = get_source(cfg.dataset)
    if type(source).count_classes is Source.count_classes:
        plan_classes(cfg, source.num_classes)  # the order's name included
    else:
        check_order_name(cfg.class_order)


def plan_classes(cfg: DataConfig, n_classes: int) -> tuple[list[int], list[int]]:
    """The class order and the classes per task of a dataset of n_classes."""
    order = resolve_class_order(cfg.class_order, n_classes, cfg.class_order_seed)
    check_class_order(order, n_classes)
    return order, make_increments(len(order), cfg.initial_increment, cfg.increment)


def build_scenario(cfg: DataConfig, shapes_only: bool = False) -> Scenario:
    """The scenario of a data config. shapes_only: no files are read (image sets are empty but shaped), enough
    to build models and count parameters."""
    if cfg.datasets:
        return _dataset_sequence(cfg, shapes_only)
    source = get_source(cfg.dataset)
    train, test, record = _load_pair(source, cfg, shapes_only)
    size = cfg.image_size or source.image_size
    channels = cfg.channels or source.channels
    train, test = _fit(train, size, channels, cfg.resize), _fit(test, size, channels, cfg.resize)
    n = source.count_classes(cfg.root)
    order, increments = plan_classes(cfg, n)
    names = train.class_names or [str(c) for c in range(n)]
    scenario = Scenario(train, test, order, increments, cfg.setting, [names[c] for c in order])
    scenario.mean, scenario.std = _stats(source, channels)
    scenario.data_record = [record] if record else []
    return scenario


def _dataset_sequence(cfg: DataConfig, shapes_only: bool) -> Scenario:
    """Each dataset is one task; its labels are shifted past the previous datasets' classes."""
    if cfg.class_order is not None:
        raise ConfigError("data.class_order: not used with data.datasets (each dataset is one task, in order)")
    sources = [get_source(name, f"data.datasets[{i}]") for i, name in enumerate(cfg.datasets)]
    size = cfg.image_size or max(s.image_size for s in sources)
    channels = cfg.channels or max(s.channels for s in sources)
    trains, tests, names, shift = [], [], [], 0
    counts, records = [], []
    for s in sources:
        train, test, record = _load_pair(s, cfg, shapes_only)
        if record:
            records.append(record)
        train, test = _fit(train, size, channels, cfg.resize), _fit(test, size, channels, cfg.resize)
        n = s.count_classes(cfg.root)
        trains.append(_shift(train, shift))
        tests.append(_shift(test, shift))
        names += [f"{s.name}:{c}" for c in (train.class_names or range(n))]
        counts.append(n)
        shift += n
    train, test = _concat(trains), _concat(tests)
    scenario = Scenario(train, test, list(range(shift)), counts, cfg.setting, names, [s.name for s in sources])
    scenario.mean, scenario.std = (0.5,) * channels, (0.5,) * channels  # no single source's statistics apply
    scenario.data_record = records
    return scenario


def _stats(source, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = tuple(source.mean), tuple(source.std)
    if len(mean) == channels:
        return mean, std
    return (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels


def _load_pair(source, cfg: DataConfig, shapes_only: bool = False) -> tuple[ImageSet, ImageSet, dict | None]:
    """The train and test sets of a source (cut to data.*_per_class) and the record of what was read."""
    if shapes_only:
        empty = ImageSet(torch.empty(0, dtype=torch.long),
                         torch.empty(0, source.channels, source.image_size, source.image_size, dtype=torch.uint8))
        return empty, empty, None
    loaded = {"train": source.load(cfg.root, train=True, download=cfg.download),
              "test": source.load(cfg.root, train=False, download=cfg.download)}
    used = dict(loaded)
    if cfg.train_per_class:
        used["train"] = loaded["train"].subset(per_class_head(loaded["train"].targets, cfg.train_per_class))
    if cfg.test_per_class:
        used["test"] = loaded["test"].subset(per_class_head(loaded["test"].targets, cfg.test_per_class))
    return used["train"], used["test"], _record(source, cfg, loaded, used)


def _record(source, cfg: DataConfig, loaded: dict[str, ImageSet], used: dict[str, ImageSet]) -> dict:
    """One dataset's entry of the run's data record: where it was read from, every file read (each once) and the
    images per split, as loaded and as used."""
    record: dict = {"dataset": source.name, "root": cfg.root, "folder": None, "files": [], "splits": {}}
    seen = set()
    for split, images in loaded.items():
        prov = dict(images.provenance or {})
        record["folder"] = record["folder"] or prov.pop("folder", None)
        prov.pop("folder", None)
        for f in prov.pop("files", []):
            if f["path"] not in seen:
                seen.add(f["path"])
                record["files"].append(f)
        if "embedded" in prov:
            record["embedded"] = prov.pop("embedded")
        record["splits"][split] = {**prov, "images": len(images), "used": len(used[split])}
    return record


def _fit(images: ImageSet, size: int, channels: int, mode: str) -> ImageSet:
    if images.images is None:
        images.image_size, images.channels = size, channels  # lazy readers fit each image as they decode it
        return images
    return ImageSet(images.targets, fit_images(images.images, size, channels, mode), class_names=images.class_names)


def _shift(images: ImageSet, shift: int) -> ImageSet:
    return ImageSet(images.targets + shift, images.images, images.read, images.class_names, images.image_size,
                    images.channels)


def _concat(sets: list[ImageSet]) -> ImageSet:
    targets = torch.cat([s.targets for s in sets])
    resident = [s.images for s in sets if s.images is not None]
    if len(resident) == len(sets):
        return ImageSet(targets, torch.cat(resident))
    return ImageSet(targets, None, ConcatReader(sets), image_size=sets[0].image_size, channels=sets[0].channels)
