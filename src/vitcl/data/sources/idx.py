"""IDX files: MNIST, Fashion-MNIST and KMNIST (28x28 grey, 10 classes, 60000 train / 10000 test).

Each dataset is four files, gzipped (`train-images-idx3-ubyte.gz`, ...) or raw (the same names without `.gz`):
    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte
IDX format: two zero bytes, a type byte (0x08 = uint8, ...), the number of dimensions, then each dimension as a
big-endian uint32, then the data, big-endian, row-major. Files are found as described in `base.py`: under
data.root when it is given, else in `/usr/share/datasets/<name>` (Debian: `apt-get install dataset-fashion-mnist`)
and the other places of the search path, else downloaded from the official address with its md5 when
data.download=true. torchvision's layout (`<root>/MNIST/raw/...`) is found too.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ...errors import DataError
from ..dataset import ImageSet
from .base import Remote, Source, file_record, register

# type byte -> numpy dtype (big-endian), as in the IDX specification
IDX_TYPES: dict[int, np.dtype] = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
                                  0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: Path) -> np.ndarray:
    """The array stored in an IDX file (gzipped or raw, told apart by content); DataError naming the file when
    it is not a complete IDX file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        reason = "truncated gzip stream" if isinstance(exc, EOFError) else (getattr(exc, "strerror", None) or exc)
        raise DataError(f"{path}: cannot read the IDX file ({reason})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (expected a header starting with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_TYPES:
        raise DataError(f"{path}: unknown IDX data type 0x{code:02x} (expected one of "
                        f"{', '.join(f'0x{c:02x}' for c in IDX_TYPES)})")
    if not 1 <= ndim <= 4:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions (expected 1 to 4)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header (expected {header} bytes, found {len(raw)})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: shape {shape} needs {expected} data bytes, found {found}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


class IdxSource(Source):
    """Four IDX files: images (N, H, W) uint8 and labels (N,) uint8 for the train and the test split."""

    channels = 1
    image_size = 28
    num_classes = 10
    class_names: tuple[str, ...] = tuple(str(i) for i in range(10))
    splits = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    files = tuple(f"{n}[.gz]" for pair in splits.values() for n in pair)  # for messages; see complete()
    torchvision_dir = ""  # torchvision keeps these files in <root>/<torchvision_dir>/raw

    def search_paths(self, root):
        paths = super().search_paths(root)
        if root and self.torchvision_dir:
            paths.insert(len(self.aliases) + 1, Path(root).expanduser() / self.torchvision_dir / "raw")
        return paths

    def complete(self, path: Path) -> bool:
        return all(self._file(path, n) is not None for pair in self.splits.values() for n in pair)

    def missing_files(self, path: Path) -> list[str]:
        return [f"{n}[.gz]" for pair in self.splits.values() for n in pair if self._file(path, n) is None]

    @staticmethod
    def _file(path: Path, stem: str) -> Path | None:
        for name in (f"{stem}.gz", stem):
            if (path / name).is_file():
                return path / name
        return None

    def load(self, root, train, download=False):
        folder = self.require(root, download)
        image_stem, label_stem = self.splits[train]
        image_file, label_file = self._file(folder, image_stem), self._file(folder, label_stem)
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{image_file}: expected uint8 images of shape (N, H, W), found {images.dtype} "
                            f"{images.shape}")
        if labels.ndim != 1:
            raise DataError(f"{label_file}: expected labels of shape (N,), found {labels.shape}")
        if len(labels) != len(images):
            raise DataError(f"{label_file}: {len(labels)} labels for the {len(images)} images of {image_file.name}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DataError(f"{label_file}: labels must lie in 0..{self.num_classes - 1}, found "
                            f"{int(labels.min())}..{int(labels.max())}")
        provenance = {"folder": os.path.abspath(folder), "files": [file_record(image_file), file_record(label_file)],
                      "images": len(labels)}
        return ImageSet(torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(images.copy())[:, None],
                        class_names=list(self.class_names), provenance=provenance)


def _remotes(base: str, md5s: dict[str, str], mirrors: tuple[str, ...] = ()) -> tuple[Remote, ...]:
    return tuple(Remote(base + name, name, md5, tuple(m + name for m in mirrors)) for name, md5 in md5s.items())


@register
class MNIST(IdxSource):
    name = "mnist"
    torchvision_dir = "MNIST"
    mean, std = (0.1307,), (0.3081,)
    # torchvision's mirrors and md5s (the md5s of the original yann.lecun.com files)
    remotes = _remotes("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }, mirrors=("http://yann.lecun.com/exdb/mnist/",))
    how_to_get = "put the four MNIST IDX files (.gz or raw) in DATA_ROOT/mnist and pass data.root=DATA_ROOT,"


@register
class FashionMNIST(IdxSource):
    name = "fashion-mnist"
    torchvision_dir = "FashionMNIST"
    mean, std = (0.2860,), (0.3530,)  # of the 60000 training images, scaled to [0, 1]
    class_names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
    # the md5s published in zalandoresearch/fashion-mnist's README (Debian's package recompresses the files, so
    # its copies have other md5s; found files are validated by parsing, not by md5)
    remotes = _remotes("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    })
    how_to_get = "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu),"


@register
class KMNIST(IdxSource):
    name = "kmnist"
    torchvision_dir = "KMNIST"
    # statistics of the training set as commonly quoted (not recomputed here: the files are not on this machine)
    mean, std = (0.1918,), (0.3483,)
    class_names = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
    # the official address (ROIS-DS CODH) and the md5s torchvision lists for it
    remotes = _remotes("http://codh.rois.ac.jp/kmnist/dataset/kmnist/", {
        "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    })
    how_to_get = "put the four KMNIST IDX files (.gz or raw) in DATA_ROOT/kmnist and pass data.root=DATA_ROOT,"
