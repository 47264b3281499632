"""CIFAR-10 and CIFAR-100 in their official "python version" (pickled dicts), 32x32 RGB.

Layout, as the official tarballs unpack:
    cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta (label_names)
    cifar-100-python/     train, test, meta (fine_label_names, coarse_label_names)
Each batch is a dict with `data` (N x 3072 uint8: the red, green and blue 32x32 planes, row-major) and `labels`
(CIFAR-10) or `fine_labels` / `coarse_labels` (CIFAR-100; the fine labels are used). The folders are found under
`<data.root>/<name>/` or directly under `<data.root>` (torchvision's layout) when data.root is given, else under
`/usr/share/datasets/<name>` and the other places of the search path, or are downloaded from the official
address (md5-checked) and unpacked when data.download=true.

The pickles are read with an unpickler that only accepts what these files contain (dicts, lists, strings,
numbers and numpy arrays), so a tampered file cannot run code.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ...errors import DataError
from ..dataset import ImageSet
from .base import Remote, Source, extract_tar, file_record, register

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 renamed numpy.core
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    """A CIFAR batch or meta file as a dict with str keys; DataError naming the file when it is not one."""
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()  # latin1: the official files are Python 2 pickles
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError) as exc:
        truncated = isinstance(exc, EOFError) or "truncated" in str(exc)
        what = "truncated" if truncated else f"{type(exc).__name__}: {exc}"
        raise DataError(f"{path}: not a readable CIFAR pickle ({what})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(values) -> list[str]:
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


class CifarSource(Source):
    channels = 3
    image_size = 32
    subdir = ""  # the folder inside the dataset folder, as the tarball unpacks
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    meta_file = ""
    label_key = ""
    names_key = ""

    @property
    def files(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(f"{self.subdir}/{f}" for f in self.train_files + self.test_files)

    def _base(self, path: Path) -> Path | None:
        """The folder holding the batches: path/subdir, or path itself (pointed at the unpacked folder)."""
        for base in (path / self.subdir, path):
            if all((base / f).is_file() for f in self.train_files + self.test_files):
                return base
        return None

    def complete(self, path: Path) -> bool:
        return self._base(path) is not None

    def missing_files(self, path: Path) -> list[str]:
        names = self.train_files + self.test_files
        lacks = [[f"{prefix}{f}" for f in names if not (base / f).is_file()]
                 for base, prefix in ((path / self.subdir, f"{self.subdir}/"), (path, ""))]
        return min(lacks, key=len)

    def unpack(self, archive: Path, dest: Path) -> None:
        extract_tar(archive, dest)

    def load(self, root, train, download=False):
        folder = self.require(root, download)
        base = self._base(folder)
        assert base is not None  # require() returns complete folders only
        images, labels, read = [], [], []
        for name in self.train_files if train else self.test_files:
            x, y = self._read_batch(base / name)
            images.append(x)
            labels.append(y)
            read.append(base / name)
        x, y = np.concatenate(images), np.concatenate(labels)
        meta = base / self.meta_file
        names = [str(c) for c in range(self.num_classes)]
        if meta.is_file():
            found = read_pickle(meta).get(self.names_key)
            if not isinstance(found, (list, tuple)) or len(found) != self.num_classes:
                raise DataError(f"{meta}: expected '{self.names_key}' with {self.num_classes} class names")
            names = _names(found)
            read.append(meta)
        provenance = {"folder": os.path.abspath(folder), "files": [file_record(f) for f in read], "images": len(y)}
        return ImageSet(torch.from_numpy(y), torch.from_numpy(x), class_names=names, provenance=provenance)

    def _read_batch(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        batch = read_pickle(path)
        for key in ("data", self.label_key):
            if key not in batch:
                raise DataError(f"{path}: no '{key}' entry (found {', '.join(sorted(map(str, batch)))})")
        data, labels = batch["data"], np.asarray(batch[self.label_key])
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            shape = getattr(data, "shape", type(data).__name__)
            raise DataError(f"{path}: expected 'data' as uint8 N x 3072, found {getattr(data, 'dtype', '')} {shape}")
        if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: expected {len(data)} integer '{self.label_key}', found {labels.shape} "
                            f"{labels.dtype}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataError(f"{path}: '{self.label_key}' must lie in 0..{self.num_classes - 1}, found "
                            f"{labels.min()}..{labels.max()}")
        return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


@register
class Cifar10(CifarSource):
    name = "cifar10"
    num_classes = 10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    subdir = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file, label_key, names_key = "batches.meta", "labels", "label_names"
    remotes = (Remote("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a"),)
    how_to_get = ("unpack cifar-10-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) into DATA_ROOT/cifar10 "
                  "and pass data.root=DATA_ROOT,")


@register
class Cifar100(CifarSource):
    name = "cifar100"
    num_classes = 100
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # as DyTox (and DER, PODNet) normalise
    subdir = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file, label_key, names_key = "meta", "fine_labels", "fine_label_names"
    remotes = (Remote("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
                      "eb9058c3a382ffc7106e4002c42a8d85"),)
    how_to_get = ("unpack cifar-100-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) into DATA_ROOT/cifar100 "
                  "and pass data.root=DATA_ROOT,")
