"""Property: whatever YAML documents and dotted overrides `vitcl run` is given, it accepts them or exits 2 with
one line; never a traceback. The config is validated before any work, so most examples call load_config in
process; a few go through cli.main up to the point where training would start."""
import contextlib
import dataclasses
import io
import tempfile
import typing
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vitcl import cli
from vitcl.config import Config
from vitcl.errors import VitclError
from vitcl.methods import METHODS
from vitcl.models import MODELS
from vitcl.runconfig import load_config

PRESET = "replay/digits-b0inc2"


def _dotted(cls, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys += _dotted(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _options(registry, section: str) -> list[str]:
    return sorted({f"{section}.{f.name}" for name in registry.names()
                   for f in dataclasses.fields(registry.get(name, section).Options)})


KEYS = sorted(set(_dotted(Config)) | set(_options(MODELS, "model")) | set(_options(METHODS, "method")))
NAMES = [*METHODS.names(), *MODELS.names()]
TRICKY = ["null", "~", "true", "no", "[]", "{}", "[1, 2]", "[a, b]", "{a: 1}", ".inf", "-.inf", ".nan", "1e400",
          "-0", "0x10", "1_000", "2026-12-01", "cuda:0", "'", "[", "{", "a: b: c", "&a 1", "*a", "!!binary aGk=",
          "!!python/object:os.system", "- x", "|", "%TAG", "\t", "é", "\x00", "𝒳", "1e-3", "5e-4"]
values = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats().map(repr), st.sampled_from(TRICKY),
                   st.sampled_from(NAMES), st.text(max_size=12))
junk_keys = st.text(alphabet="abtrain._ ", min_size=0, max_size=10)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + ".x"), junk_keys)
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", keys, values), max_size=4)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(), st.text(max_size=8),
                    st.sampled_from(NAMES))
mapping_keys = st.one_of(st.sampled_from(["run", "data", "model", "method", "memory", "train", "eval", "defaults",
                                          "name", "epochs", "increment", "augment", "size", "lr"]),
                         st.sampled_from(KEYS).map(lambda k: k.split(".")[-1]), st.text(max_size=6), st.integers())
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(mapping_keys, inner, max_size=4)),
                     max_leaves=12)
sections = st.dictionaries(st.sampled_from(["run", "data", "model", "method", "memory", "train", "eval"]),
                           st.dictionaries(st.sampled_from([k.split(".", 1)[1] for k in KEYS if "." in k]), trees,
                                           max_size=3), max_size=3)


def _dump(doc) -> bytes:
    import yaml

    return yaml.safe_dump(doc, allow_unicode=True).encode("utf-8")


documents = st.one_of(sections.map(_dump), trees.map(_dump), st.text(max_size=60).map(str.encode),
                      st.binary(max_size=40))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _write(doc: bytes, folder: Path) -> str:
    fd, name = tempfile.mkstemp(dir=folder, suffix=".yaml")
    with open(fd, "wb") as f:
        f.write(doc)
    return name


def _accepted_or_one_line_error(sources: list[str], items: list[str]) -> None:
    """load_config returns or raises a VitclError (which cli.main prints as one line: the last test checks it)."""
    try:
        load_config(sources, items)
    except VitclError as exc:
        assert str(exc).strip(), "an error without a message"


@settings(max_examples=100, deadline=None)
@given(overrides)
def test_any_overrides_are_accepted_or_one_line_errors(items):
    _accepted_or_one_line_error([PRESET], items)


@settings(max_examples=100, deadline=None)
@given(documents, overrides)
def test_any_yaml_document_is_accepted_or_a_one_line_error(workdir, doc, items):
    _accepted_or_one_line_error([PRESET, _write(doc, workdir)], items)


class _TrainingWouldStart(Exception):
    pass


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents, overrides)
@example(b"train: {epochs: 1}\n", ["=\n"])  # a message that quotes a newline stays one line
@example(b"\xff\xfe", [])
def test_vitcl_run_exits_2_with_one_line_or_gets_to_training(workdir, doc, items):
    err = io.StringIO()
    with mock.patch("vitcl.engine.trainer.Trainer", side_effect=_TrainingWouldStart), \
            contextlib.redirect_stderr(err):
        try:
            code = cli.main(["run", PRESET, _write(doc, workdir), *items, f"run.out_dir={workdir / 'runs'}", "-q"])
        except _TrainingWouldStart:
            return
    assert code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitcl: error: "), err.getvalue()
