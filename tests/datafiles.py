"""Writers of tiny dataset files in the real on-disk formats (IDX, CIFAR pickles, ImageFolder trees), for tests.

They are written independently of the readers (struct and pickle by hand), so a test checks the reader against
the format, not against itself.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: 0, 0, type 0x08 (uint8), ndim, big-endian uint32 dims, the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    data = idx_bytes(array)
    path = Path(f"{path}.gz") if gz else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_idx_dataset(folder: Path, per_class: tuple[int, int] = (3, 2), size: int = 28, gz: bool = True,
                     classes: int = 10, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four IDX files of an MNIST-like set with `per_class` (train, test) images of each class; the images
    are random, the labels cycle through the classes. Returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in zip(("train", "test"), per_class):
        labels = np.tile(np.arange(classes, dtype=np.uint8), n)
        images = rng.integers(0, 256, (len(labels), size, size), dtype=np.uint8)
        image_name, label_name = IDX_NAMES[split]
        write_idx(Path(folder) / image_name, images, gz)
        write_idx(Path(folder) / label_name, labels, gz)
        out[split] = (images, labels)
    return out


def cifar_rows(n: int, seed: int) -> np.ndarray:
    """n CIFAR rows (3072 bytes: red plane, green plane, blue plane); row i's planes hold i, 100 + i, 200 + i
    in their first pixel so the channel order can be checked."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    for i in range(n):
        rows[i, 0], rows[i, 1024], rows[i, 2048] = i % 100, 100 + i % 100, 200 + i % 50
    return rows


def dump(obj, path: Path, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10(folder: Path, per_batch: int = 10, bytes_keys: bool = False) -> Path:
    """cifar-10-batches-py/ with 5 train batches, a test batch and batches.meta, in the official dict layout."""
    base = Path(folder) / "cifar-10-batches-py"
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        labels = [(j + i) % 10 for j in range(per_batch)]
        dump({key("batch_label"): f"batch {i}", key("labels"): labels, key("data"): cifar_rows(per_batch, i),
              key("filenames"): [f"img_{i}_{j}.png" for j in range(per_batch)]}, base / name)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump({key("label_names"): names, key("num_cases_per_batch"): per_batch, key("num_vis"): 3072}, base / "batches.meta")
    return base


def make_cifar100(folder: Path, n_train: int = 200, n_test: int = 100) -> Path:
    base = Path(folder) / "cifar-100-python"
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        fine = [j % 100 for j in range(n)]
        dump({"filenames": [f"{j}.png" for j in range(n)], "batch_label": name, "fine_labels": fine,
              "coarse_labels": [c // 5 for c in fine], "data": cifar_rows(n, seed)}, base / name)
    dump({"fine_label_names": [f"fine{c}" for c in range(100)],
          "coarse_label_names": [f"coarse{c}" for c in range(20)]}, base / "meta")
    return base


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (6, 5), mode: str = "RGB") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.new("L", size, colour[0]).save(path)
    else:
        Image.new("RGB", size, colour).save(path)
    return path


def colour_of(label: int, index: int) -> tuple[int, int, int]:
    return (10 * label + 5, index, 200)


def make_image_tree(folder: Path, classes=("cat", "dog", "owl"), per_class=(3, 2), test_dir: str = "test") -> Path:
    """folder/train/<class>/<i>.png and folder/<test_dir>/<class>/<i>.png; image i of class c is one colour."""
    for split, n in zip(("train", test_dir), per_class):
        for label, name in enumerate(classes):
            for i in range(n):
                write_png(Path(folder) / split / name / f"{i}.png", colour_of(label, i))
    return Path(folder)


def write_jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (8, 8), truncate: int = 0) -> Path:
    """A JPEG of one colour; truncate > 0 keeps only its first `truncate` bytes (a download cut short)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:truncate] if truncate else data)
    return path


def make_jpeg_tree(folder: Path, classes=("a", "b"), per_class=(4, 2), broken: str | None = None) -> Path:
    """folder/train/<class>/<i>.jpg and folder/test/<class>/<i>.jpg; `broken`, a path relative to folder, is
    written truncated to its first 200 bytes (the header decodes, the image data does not)."""
    for split, n in zip(("train", "test"), per_class):
        for label, name in enumerate(classes):
            for i in range(n):
                rel = f"{split}/{name}/{i}.jpg"
                write_jpeg(Path(folder) / rel, colour_of(label, i), truncate=200 if rel == broken else 0)
    return Path(folder)
