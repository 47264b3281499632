"""Typed run configuration: stacked YAML files plus dotted overrides, validated before any work.

A config is a tree of dataclasses. The `model` and `method` sections are polymorphic: their `name` picks a
registered options dataclass, which then validates the rest of the section. Every error names the dotted key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"


# --------------------------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    name: str | None = None  # run folder name under out_dir; default: preset name + timestamp
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    threads: int | None = None  # torch intra-op threads; default: torch's choice
    progress: bool = True


@dataclass
class AugmentConfig:
    crop_padding: int = 0  # zero-pad then random crop back to size (CIFAR: 4)
    hflip: bool = False
    randaugment_n: int = 0  # 0 disables RandAugment
    randaugment_m: int = 9
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0
    mean: list[float] | None = None  # default: the source's statistics
    std: list[float] | None = None


@dataclass
class DataConfig:
    dataset: str = "digits"
    datasets: list[str] = field(default_factory=list)  # a sequence of datasets, one (or more) tasks each
    root: str | None = None  # where sources look first; then their standard places
    download: bool = False
    image_size: int | None = None  # common size of all images; default: the source's
    resize: Literal["pad", "resize"] = "resize"  # how a smaller image reaches image_size
    channels: int | None = None  # 1 or 3; default: the source's (the largest in a sequence)
    setting: Literal["class-il", "task-il"] = "class-il"
    class_order: Union[str, list[int], None] = None  # None: 0..C-1; "random": seeded permutation; or a named order
    class_order_seed: int = 1993
    initial_increment: int = 0  # classes in the first task; 0: the same as increment
    increment: Union[int, list[int]] = 2
    train_per_class: int | None = None  # keep only the first N training images of each class
    test_per_class: int | None = None
    num_workers: int = 2  # decoding workers, for sources read lazily from disk
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class MemoryConfig:
    size: int = 0  # fixed total budget, shared by all seen classes
    per_class: int = 0  # fixed budget per class (exclusive with size)
    selection: str = "herding"
    features_augment: bool = False  # extract selection features with the training augmentation


@dataclass
class OptimConfig:
    """The optimiser and its per-epoch lr schedule: what a training phase optimises with (`train` extends it)."""

    optimizer: Literal["sgd", "adamw", "adam"] = "adamw"
    lr: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.05
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    grad_clip: float | None = None

    def optim(self) -> "OptimConfig":
        """These settings alone (a copy), without what a subclass adds."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(OptimConfig)}
        return OptimConfig(**{**values, "milestones": list(self.milestones)})


@dataclass
class TrainConfig(OptimConfig):
    epochs: int = 10
    first_task_epochs: int | None = None
    batch_size: int = 128  # global batch, split across ranks
    first_task_lr: float | None = None
    lr_scale_batch: int | None = None  # linear scaling rule: lr * batch_size / lr_scale_batch
    grad_accum: int = 1
    eval_every: int = 0  # epochs between periodic evaluations; 0: only at the end of each task
    checkpoint_every: int = 1  # epochs between resume checkpoints
    max_batches: int | None = None  # cap on batches per epoch (smoke runs)

    def scaled_lr(self, lr: float) -> float:
        """lr under the linear scaling rule (every lr a method trains with is given for lr_scale_batch)."""
        if self.lr_scale_batch:
            return lr * self.batch_size / self.lr_scale_batch
        return lr


@dataclass
class EvalConfig:
    batch_size: int = 256
    top_k: int = 5
    # analyses recorded after each task on a fixed held-out test batch, into RUN_DIR/analysis (`vitcl analyze`
    # computes the same from the task checkpoints): non-locality per layer and head, covariance spectrum of the
    # final representation, attention heat maps
    analyses: list[Literal["nonlocality", "spectrum", "heatmaps"]] = field(default_factory=list)
    analysis_samples: int = 256  # size of the held-out batch (balanced over all classes, same for every run)
    analysis_images: int = 4  # images in the heat-map grid (the first ones of the held-out batch)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None  # options dataclass of the registered model named by model.name
    method: Any = None  # options dataclass of the registered method named by method.name
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return to_dict(self)


# --------------------------------------------------------------------------------------------- typing
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return value checked against tp; ints are accepted where floats are expected."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass cls from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        path = f"{key}.{k}" if key else str(k)
        if k not in names:
            close = ", ".join(sorted(names))
            raise ConfigError(f"{path}: unknown key; expected one of: {close}")
        kwargs[k] = _coerce(v, hints[k], path)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check(key)
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------- loading
def preset_names() -> list[str]:
    """Runnable presets: every YAML under configs/ except the fragments in data/ and base/."""
    names = []
    for path in sorted(PRESET_DIR.rglob("*.yaml")):
        rel = path.relative_to(PRESET_DIR).with_suffix("").as_posix()
        if rel.split("/")[0] not in ("data", "base"):
            names.append(rel)
    return names


def resolve_source(source: str) -> Path:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = PRESET_DIR / f"{source}.yaml"
    if preset.exists():
        return preset
    if path.suffix in (".yaml", ".yml"):
        raise ConfigError(f"{source}: config file not found")
    raise ConfigError(f"{source}: no such preset or YAML file (see `vitcl presets`)")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def merge(base: dict, update: dict) -> dict:
    """Deep merge; a model or method section naming another model or method replaces the old one whole."""
    out = dict(base)
    for k, v in update.items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            renamed = k in ("model", "method") and "name" in v and v["name"] != old.get("name")
            out[k] = dict(v) if renamed else merge(old, v)
        else:
            out[k] = v
    return out


def load_source(source: str, _seen: tuple = ()) -> dict:
    """A YAML file with its `defaults:` list (other presets or files) merged in first."""
    path = resolve_source(source)
    if path in _seen:
        raise ConfigError(f"{path}: `defaults` include themselves")
    data = _read_yaml(path)
    defaults = data.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: defaults: expected a list of presets or files")
    merged: dict = {}
    for d in defaults:
        merged = merge(merged, load_source(str(d), _seen + (path,)))
    return merge(merged, data)


def parse_override(text: str) -> dict:
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{text}: empty key")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(sources: list[str], overrides: list[str] = ()) -> tuple[Config, dict]:
    """Merge sources (presets or YAML files) and overrides; return the validated config and the raw tree."""
    raw: dict = {}
    for s in sources:
        raw = merge(raw, load_source(s))
    for o in overrides:
        raw = merge(raw, parse_override(o))
    return from_dict(raw), raw


def from_dict(raw: dict) -> Config:
    from .methods import METHODS  # registries fill on import
    from .models import MODELS

    raw = dict(raw)
    model_raw = {"name": "vit", **(raw.pop("model", None) or {})}
    method_raw = {"name": "finetune", **(raw.pop("method", None) or {})}
    cfg = build(Config, raw)
    cfg.model = _build_named(MODELS, model_raw, "model")
    cfg.method = _build_named(METHODS, method_raw, "method")
    validate(cfg)
    return cfg


def _build_named(registry, raw: dict, key: str):
    name = raw.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{key}.name: expected one of: {', '.join(registry.names())}")
    options_cls = registry.get(name, f"{key}.name").Options
    return build(options_cls, raw, key)


def validate(cfg: Config) -> None:
    """Checks across sections; per-field checks live in the dataclasses' validate()."""
    t, d, m = cfg.train, cfg.data, cfg.memory
    positive = {
        "train.epochs": t.epochs, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
        "eval.batch_size": cfg.eval.batch_size, "train.checkpoint_every": t.checkpoint_every,
        "eval.analysis_samples": cfg.eval.analysis_samples,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: expected a positive integer, got {value}")
    for key, value in {"train.lr": t.lr, "train.weight_decay": t.weight_decay, "memory.size": m.size,
                       "memory.per_class": m.per_class, "train.warmup_epochs": t.warmup_epochs}.items():
        if value < 0:
            raise ConfigError(f"{key}: expected a value >= 0, got {value}")
    if m.size and m.per_class:
        raise ConfigError("memory.per_class: give either memory.size (a fixed total) or memory.per_class, not both")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.grad_accum: {t.grad_accum} must divide train.batch_size {t.batch_size}")
    if t.schedule == "multistep" and not t.milestones:
        raise ConfigError("train.milestones: the multistep schedule needs a list of epochs")
    if d.channels not in (None, 1, 3):
        raise ConfigError(f"data.channels: expected 1 or 3, got {d.channels}")
    inc = d.increment if isinstance(d.increment, list) else [d.increment]
    if any(i < 1 for i in inc) or d.initial_increment < 0:
        raise ConfigError(f"data.increment: expected positive class counts, got {d.increment}")
    a = d.augment
    if not 0 <= a.label_smoothing < 1:
        raise ConfigError(f"data.augment.label_smoothing: expected a value in [0, 1), got {a.label_smoothing}")
    if a.randaugment_n < 0 or not 0 <= a.randaugment_m <= 30:
        raise ConfigError("data.augment.randaugment_m: expected n >= 0 and a magnitude in [0, 30]")
