"""The typed sections of a run's config, and the coercion that checks plain values against their type hints.

A config is a tree of dataclasses. This module knows no model or method: the `model` and `method` sections hold
the options dataclass that the registered model or method names, and `vitcl.runconfig` (above methods and models)
picks it, stacks presets and overrides, and runs the checks across sections. Every error names the dotted key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .errors import ConfigError, closest


# --------------------------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    name: str | None = None  # run folder name under out_dir; default: preset name + timestamp
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False  # torch.compile the model (a method's compile_modules: DyTox its encoder and decoder)
    compile_backend: str = "inductor"  # torch.compile's backend (eager / aot_eager: dynamo without code generation)
    tf32: bool = False  # CUDA: TF32 matmuls and convolutions (faster, 10-bit mantissa; the presets keep full fp32)
    channels_last: bool = False  # the model's 4-d weights and the images in channels-last layout (CNN backbones)
    threads: int | None = None  # torch intra-op threads; default: torch's choice
    progress: bool = True
    # where metrics go besides metrics.jsonl (always written): tensorboard, wandb, csv (eval/loggers.py)
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    wandb_project: str = "vitcl"
    wandb_mode: Literal["offline", "online"] = "offline"  # offline needs no account; `wandb sync` uploads later

    def validate(self, key: str) -> None:
        known = ("jsonl", "tensorboard", "wandb", "csv")
        for name in self.loggers:
            if name not in known:
                raise ConfigError(f"{key}.loggers: unknown logger '{name}'; expected some of: {', '.join(known)}")
        if len(set(self.loggers)) != len(self.loggers):
            raise ConfigError(f"{key}.loggers: a logger is listed twice")


@dataclass
class AugmentConfig:
    # the training crop (docs/methods/dytox.md#imagenet-crops). pad: zero-pad by crop_padding and crop back at a
    # random offset, on the device (CIFAR: 4; 0: no crop). random-resized: timm's RandomResizedCrop, per image
    # before batching: a box of random area (a fraction in random_resized_scale) and aspect ratio (log-uniform in
    # random_resized_ratio), resized to data.image_size with crop_interpolation
    crop: Literal["pad", "random-resized"] = "pad"
    crop_padding: int = 0
    random_resized_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    random_resized_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    crop_interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # timm's default; DyTox and LPA: bicubic
    hflip: bool = False
    # timm's RandAugment, per image (data/randaugment.py): a timm policy string such as rand-m9-mstd0.5-inc1
    randaugment: str | None = None
    randaugment_interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # its rotate, shear and translate
    # uint8 value per channel where rotate, shear and translate leave the image; null: the normalisation mean
    # (timm's img_mean, from the mean create_transform is given)
    randaugment_fill: list[int] | None = None
    randaugment_n: int = 0  # kornia's batch-level RandAugment: n ops (0: off), magnitude m on its 0..30 scale
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
    class_order: str | list[int] | None = None  # None: 0..C-1; "random": seeded permutation; or a named order
    class_order_seed: int = 1993
    initial_increment: int = 0  # classes in the first task; 0: the same as increment
    increment: int | list[int] = 2
    train_per_class: int | None = None  # keep only the first N training images of each class
    test_per_class: int | None = None
    num_workers: int = 2  # decoding workers, for sources read lazily from disk
    # evaluation crop (docs/methods/dytox.md#imagenet-crops): null resizes each test image to image_size; a
    # fraction in (0, 1] resizes its short side to floor(image_size / test_crop_pct) with test_interpolation and
    # keeps the centre image_size x image_size (timm's ImageNet evaluation: 0.875, 256 px for 224)
    test_crop_pct: float | None = None
    test_interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class MemoryConfig:
    size: int = 0  # fixed total budget, shared by all seen classes
    per_class: int = 0  # fixed budget per class (exclusive with size)
    selection: str = "herding"
    features_augment: bool = False  # extract selection features with the training augmentation
    # 1: one global memory; N: DyTox's distributed memory, a bank of `size` rows per emulated rank (each herded on
    # its own feature draws, each rank training on task + its own bank); N must be a multiple of the process count
    ranks: int = 1


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
    # epoch-start: epoch e runs at lr(e). timm-after-epoch: DyTox's and LPA's `lr_scheduler.step(epoch)` after each
    # epoch, so epoch e >= 1 runs at lr(e - 1) and epoch 0 at lr(0): the schedule one epoch behind, warm-up included
    lr_step: Literal["epoch-start", "timm-after-epoch"] = "epoch-start"
    min_lr: float = 1e-5
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    grad_clip: float | None = None

    def optim(self) -> OptimConfig:
        """These settings alone (a copy), without what a subclass adds."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(OptimConfig)}
        return OptimConfig(**{**values, "milestones": list(self.milestones)})


@dataclass
class TrainConfig(OptimConfig):
    epochs: int = 10
    first_task_epochs: int | None = None
    batch_size: int = 128  # global batch, split across ranks
    drop_last: bool = False  # drop each epoch's last partial batch in the phases built from this section
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
    # the largest batch that fits: a batch that runs out of GPU memory halves batch_size for the rest of the run
    # and the evaluation starts again (one process only: ranks would part ways)
    fit_batch: bool = False
    top_k: int = 5
    # analyses recorded after each task on a fixed held-out test batch, into RUN_DIR/analysis (`vitcl analyze`
    # computes the same from the task checkpoints): non-locality per layer and head, covariance spectrum of the
    # final representation, attention heat maps
    analyses: list[Literal["nonlocality", "spectrum", "heatmaps"]] = field(default_factory=list)
    analysis_samples: int = 256  # size of the held-out batch (balanced over all classes, same for every run)
    analysis_images: int = 4  # images in the heat-map grid (the first ones of the held-out batch)


# the metrics a `published.values` entry may name (eval/report.py reads each from results.json): class-IL Avg,
# Last, forgetting, top-5 Avg and Last; task-IL Avg, Last, forgetting, and the mean of each task's best accuracy
# while it trained (the Mask-RKR code's protocol); the final parameter count in millions. Accuracies in percent.
PUBLISHED_METRICS = ("avg", "last", "forgetting", "avg_top5", "last_top5", "task_il_avg", "task_il_last",
                     "task_il_forgetting", "task_il_avg_best", "params_m")


@dataclass
class PublishedConfig:
    """The published cell a reproduction preset aims at (its header says the same in words). It changes nothing
    in the run; `vitcl report` prints it beside the measured values."""

    source: str = ""  # paper (or erratum) and table, e.g. "DyTox erratum, Table 1 (CIFAR-100, B0)"
    row: str = ""  # the table's row, e.g. "DyTox, distributed memory, 2 GPUs"
    column: str = ""  # e.g. "10 steps"
    values: dict[str, float] = field(default_factory=dict)  # metric (PUBLISHED_METRICS) -> published number
    std: dict[str, float] = field(default_factory=dict)  # the printed +- where the table gives one

    def validate(self, key: str) -> None:
        for part in ("values", "std"):
            for name, value in getattr(self, part).items():
                if name not in PUBLISHED_METRICS:
                    raise ConfigError(f"{key}.{part}.{name}: unknown metric; expected one of: "
                                      f"{', '.join(PUBLISHED_METRICS)}")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ConfigError(f"{key}.{part}.{name}: expected a finite number, got {value!r}")
        extra = set(self.std) - set(self.values)
        if extra:
            raise ConfigError(f"{key}.std.{sorted(extra)[0]}: a std without a published value")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None  # options dataclass of the registered model named by model.name
    method: Any = None  # options dataclass of the registered method named by method.name
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    published: PublishedConfig = field(default_factory=PublishedConfig)

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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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


# names other toolboxes use for a key vitcl names differently: the error says which key to use
# the names other toolboxes give vitcl's keys (DeiT/DyTox's command line, Mammoth's, PyCIL's and FACIL's options);
# an unknown key found here points to vitcl's name when the section has it
KEY_SYNONYMS = {
    # model
    "weights": "pretrained", "checkpoint": "pretrained", "pretrained_weights": "pretrained", "finetune": "pretrained",
    "drop_path_rate": "drop_path", "drop_rate": "drop", "attn_drop_rate": "attn_drop",
    # train
    "init_lr": "lr", "learning_rate": "lr", "lrate": "lr", "num_epochs": "epochs", "n_epochs": "epochs",
    "nepochs": "epochs", "init_epoch": "first_task_epochs", "batch": "batch_size", "bs": "batch_size",
    "opt": "optimizer", "optim": "optimizer", "sched": "schedule", "scheduler": "schedule", "clip_grad": "grad_clip",
    "clipgrad": "grad_clip", "optim_wd": "weight_decay", "wd": "weight_decay", "optim_mom": "momentum",
    "optim_nesterov": "nesterov", "decay_epochs": "lr_step", "decay_rate": "gamma", "lr_decay": "gamma",
    # data and augmentation
    "data_set": "dataset", "data_path": "root", "data_dir": "root", "input_size": "image_size",
    "init_cls": "initial_increment", "base_increment": "initial_increment", "nc_first_task": "initial_increment",
    "workers": "num_workers", "smoothing": "label_smoothing", "mixup": "mixup_alpha", "cutmix": "cutmix_alpha",
    "aa": "randaugment",
    # memory and method
    "buffer_size": "size", "memory_size": "size", "mem_size": "size", "num_exemplars": "size",
    "memory_per_class": "per_class", "num_exemplars_per_class": "per_class", "minibatch_size": "memory_batch",
    "gamma": "margin",  # Mammoth's GEM
    # run
    "output_dir": "out_dir", "output": "out_dir",
}


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
            expected = ", ".join(sorted(names))
            usual = KEY_SYNONYMS.get(str(k))
            if usual in names:
                raise ConfigError(f"{path}: unknown key; vitcl calls it {key}.{usual} (expected one of: {expected})")
            close = closest(k, sorted(names))
            if close:
                where = f"{key}.{close[0]}" if key else close[0]
                raise ConfigError(f"{path}: unknown key; did you mean {where}? (expected one of: {expected})")
            raise ConfigError(f"{path}: unknown key; expected one of: {expected}")
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
