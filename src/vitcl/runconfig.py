"""Building a run's config: presets, stacked YAML files and dotted overrides, the named `model` and `method`
sections, the checks across sections, and the run folder's `config.yaml` (one writer, one reader).

This module sits above models and methods (it looks their options up in the registries) and below the engine and
the command line; `vitcl.config` below it holds only the typed sections.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import Config, build
from .data.build import check_without_files
from .data.randaugment import parse_policy
from .errors import ConfigError, VitclError, closest
from .methods import METHODS
from .models import MODELS
from .registry import Registry

PRESET_DIR = Path(__file__).parent / "configs"
SECTIONS = ("run", "data", "model", "method", "memory", "train", "eval", "published")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
RUN_CONFIG = "config.yaml"  # in a run folder: the resolved config, with the sources and overrides it came from


# --------------------------------------------------------------------------------------------- presets and files
def config_names() -> list[str]:
    """Every YAML under configs/ by the name a command line gives it: the presets, fragments and overlays."""
    return [p.relative_to(PRESET_DIR).with_suffix("").as_posix() for p in sorted(PRESET_DIR.rglob("*.yaml"))]


def preset_names() -> list[str]:
    """Runnable presets: every YAML under configs/ except the fragments in data/ and base/ and the overlays/."""
    return [name for name in config_names() if name.split("/")[0] not in ("data", "base", "overlays")]


def resolve_source(source: str) -> Path:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = PRESET_DIR / f"{source}.yaml"
    if preset.exists():
        return preset
    if path.suffix in (".yaml", ".yml"):
        raise ConfigError(f"{source}: config file not found")
    if source.split(".")[0] in SECTIONS and "." in source and "/" not in source:
        raise ConfigError(f"{source}: looks like an override without a value; write {source}=VALUE")
    close = closest(source, config_names(), n=3, cutoff=0.8)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"{source}: no such preset or YAML file{hint} (see `vitcl presets`)")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (not last-wins)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_text(path: Path, error: type[VitclError] = ConfigError) -> str:
    """A config file's text as UTF-8; a file that is not text or cannot be read is a one-line error."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                    f"save it as UTF-8") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _read_yaml(path: Path) -> dict:
    text = read_text(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.reader.ReaderError as exc:
        raise ConfigError(f"{path}: invalid YAML (character {chr(exc.character)!r} at offset {exc.position} is not "
                          f"allowed)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{path}:{where} invalid YAML ({problem})") from None
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
    merged.pop("published", None)  # a preset built on another aims at its own cell, or at none
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


# --------------------------------------------------------------------------------------------- building
def load_config(sources: list[str], overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, dict]:
    """Merge sources (presets or YAML files) and overrides; return the validated config and the raw tree."""
    raw: dict = {}
    for s in sources:
        raw = merge(raw, load_source(s))
    for o in overrides:
        raw = merge(raw, parse_override(o))
    return from_dict(raw), raw


def from_dict(raw: dict) -> Config:
    """The validated config of a raw tree: sections, the named model and method options, the checks across
    sections and the method's own checks of the whole config (before any data is read)."""
    raw = dict(raw)
    for key in ("model", "method"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"{key}: expected a mapping, got {raw[key]!r}")
    model_raw = {"name": "vit", **(raw.pop("model", None) or {})}
    method_raw = {"name": "finetune", **(raw.pop("method", None) or {})}
    cfg = build(Config, raw)
    cfg.model = _build_named(MODELS, model_raw, "model")
    cfg.method = _build_named(METHODS, method_raw, "method")
    validate(cfg)
    check_without_files(cfg.data)
    check = getattr(METHODS.get(cfg.method.name, "method.name"), "check", None)
    if check is not None:
        check(cfg)
    return cfg


def _build_named(registry: Registry, raw: dict, key: str):
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
        "eval.analysis_samples": cfg.eval.analysis_samples, "memory.ranks": m.ranks,
    }
    for key, count in positive.items():
        if count < 1:
            raise ConfigError(f"{key}: expected a positive integer, got {count}")
    # settings whose "unset" is null: a value given must be in range (0 is not a way to say "unset")
    positive_or_null = {
        "train.first_task_epochs": t.first_task_epochs, "train.max_batches": t.max_batches,
        "train.lr_scale_batch": t.lr_scale_batch, "run.threads": cfg.run.threads, "data.image_size": d.image_size,
        "data.train_per_class": d.train_per_class, "data.test_per_class": d.test_per_class,
        "eval.top_k": cfg.eval.top_k,
    }
    for key, maybe in positive_or_null.items():
        if maybe is not None and maybe < 1:
            raise ConfigError(f"{key}: expected a positive integer (or null for the default), got {maybe}")
    at_least_zero: dict[str, float] = {"train.lr": t.lr, "train.weight_decay": t.weight_decay, "memory.size": m.size,
                                       "memory.per_class": m.per_class, "train.warmup_epochs": t.warmup_epochs,
                                       "train.eval_every": t.eval_every, "data.num_workers": d.num_workers,
                                       "eval.analysis_images": cfg.eval.analysis_images,
                                       "train.first_task_lr": t.first_task_lr or 0.0}
    for key, value in at_least_zero.items():
        if value < 0:
            raise ConfigError(f"{key}: expected a value >= 0, got {value}")
    if m.size and m.per_class:
        raise ConfigError("memory.per_class: give either memory.size (a fixed total) or memory.per_class, not both")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.grad_accum: {t.grad_accum} must divide train.batch_size {t.batch_size}")
    if m.ranks > 1 and t.batch_size % m.ranks:
        raise ConfigError(f"memory.ranks: {m.ranks} emulated ranks must divide train.batch_size {t.batch_size} "
                          f"(each rank takes an equal share of every batch)")
    if t.schedule == "multistep" and not t.milestones:
        raise ConfigError("train.milestones: the multistep schedule needs a list of epochs")
    if not DEVICE.fullmatch(cfg.run.device):
        raise ConfigError(f"run.device: expected auto, cpu, cuda, cuda:N or mps, got {cfg.run.device!r}")
    for key, text in (("run.name", cfg.run.name), ("run.out_dir", cfg.run.out_dir)):
        if text is not None and "\0" in text:
            raise ConfigError(f"{key}: a NUL character cannot be part of a folder name")
    name = cfg.run.name
    if name is not None and (not name or "/" in name or "\\" in name or name in (".", "..")):
        raise ConfigError(f"run.name: expected a folder name inside run.out_dir (no '/' and not '..'), got {name!r}")
    if d.channels not in (None, 1, 3):
        raise ConfigError(f"data.channels: expected 1 or 3, got {d.channels}")
    inc = d.increment if isinstance(d.increment, list) else [d.increment]
    if any(i < 1 for i in inc) or d.initial_increment < 0:
        raise ConfigError(f"data.increment: expected positive class counts, got {d.increment}")
    a = d.augment
    check_crops(d)
    if a.randaugment_fill is not None and not all(0 <= v <= 255 for v in a.randaugment_fill):
        raise ConfigError(f"data.augment.randaugment_fill: expected uint8 values in 0..255, got {a.randaugment_fill}")
    if not 0 <= a.label_smoothing < 1:
        raise ConfigError(f"data.augment.label_smoothing: expected a value in [0, 1), got {a.label_smoothing}")
    if a.randaugment_n < 0 or not 0 <= a.randaugment_m <= 30:
        raise ConfigError("data.augment.randaugment_m: expected n >= 0 and a magnitude in [0, 30]")
    if a.randaugment is not None:
        parse_policy(a.randaugment)
        if a.randaugment_n > 0:
            raise ConfigError("data.augment.randaugment: timm's per-image RandAugment and kornia's batch-level one "
                              "(randaugment_n > 0) are alternatives; set randaugment: null or randaugment_n: 0")


def check_crops(d) -> None:
    """The crop settings of a data section (DataConfig)."""
    a = d.augment
    if a.crop_padding < 0:
        raise ConfigError(f"data.augment.crop_padding: expected a value >= 0, got {a.crop_padding}")
    if a.crop == "random-resized" and a.crop_padding:
        raise ConfigError("data.augment.crop_padding: the pad-crop does not apply with data.augment.crop: "
                          "random-resized; set crop_padding: 0 or crop: pad")
    scale, ratio = a.random_resized_scale, a.random_resized_ratio
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"data.augment.random_resized_scale: expected [min, max] with 0 < min <= max <= 1, "
                          f"got {scale}")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ConfigError(f"data.augment.random_resized_ratio: expected [min, max] with 0 < min <= max, got {ratio}")
    if d.test_crop_pct is not None and not 0 < d.test_crop_pct <= 1:
        raise ConfigError(f"data.test_crop_pct: expected a fraction in (0, 1] (or null: resize only), "
                          f"got {d.test_crop_pct}")


# --------------------------------------------------------------------------------------------- run folders
@dataclass
class RunSpec:
    """What a run folder's config.yaml says: the resolved config and the command-line items it came from."""

    config: Config
    sources: list[str]
    overrides: list[str]


def save_run_config(run_dir: Path, cfg: Config, sources: list[str], overrides: list[str]) -> Path:
    doc = {"sources": list(sources), "overrides": list(overrides), **cfg.to_dict()}
    path = run_dir / RUN_CONFIG
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def load_run_config(run_dir: Path) -> RunSpec:
    path = run_dir / RUN_CONFIG
    if not path.exists():
        raise VitclError(f"{path}: not found; expected a run folder made by `vitcl run`")
    text = read_text(path, VitclError)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raise VitclError(f"{path}: corrupt YAML") from None
    if not isinstance(raw, dict):
        raise VitclError(f"{path}: expected a mapping")
    sources, overrides = raw.pop("sources", None) or [], raw.pop("overrides", None) or []
    return RunSpec(from_dict(raw), list(sources), list(overrides))


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every setting that differs between two config trees."""
    out = []
    for k in [*old, *(k for k in new if k not in old)]:
        a, b = old.get(k), new.get(k)
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, key + ".")
        elif a != b:
            out.append((key, a, b))
    return out
