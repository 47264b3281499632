"""ImageFolder trees with optional split lists, decoded lazily with Pillow (ImageNet-100/1000, DTD, GTSRB, ...).

Where: a dataset folder D is found as described in `base.py` (`<data.root>/<name>` or `<data.root>` when data.root
is given; else `$VITCL_DATA/<name>`, `/usr/share/datasets/<name>`). The generic `imagefolder` source reads
D = data.root.

How the train and test splits are found in D, in this order:
1. Split lists. Text files with one `relative/path label` line per image (integer labels 0..C-1; blank lines and
   lines starting with `#` are skipped; a path may contain spaces, the label is the last field), as the
   ImageNet-100 splits `train_100.txt` / `val_100.txt` are published. Train list: the source's own file names
   (ImageNet-100: `train_100.txt`), then `train.txt`. Test list: the source's own (`val_100.txt`), then
   `test.txt`, then `val.txt`. Paths are relative to D; when the first listed image is not there, they are taken
   relative to D/train (train list) or D/val, D/test (test list), so lists written either way work. A class's
   name is the folder name of its first listed image. Every listed file must exist.
2. Folders. `D/train/<class>/.../<image>` and `D/test/<class>/...` (or `D/val/<class>/...`). Classes are the
   sub-folders of D/train in sorted order (torchvision's ImageFolder order), the label is the position in that
   order.
Every class must have images in both splits: an empty class folder, a class in one split only, or a label no
line names is an error when the set is built, before any training. Sources with a known number of classes
(ImageNet-100: 100, ...) check it. The files are listed once, with their sizes, and the run records a checksum
of the sorted (relative path, size) list rather than hashing every image.

Images are the files with the usual extensions (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp .gif, any case).
Nothing is decoded when the set is built: `ImageSet.read(i)` decodes image i to RGB uint8 in a DataLoader worker,
where the stream crops or resizes it to data.image_size (data/crops.py). Paths are kept in one numpy byte buffer
(not a list of Python strings) so that a million of them pickle quickly into workers and stay shared after fork.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ...errors import DataError
from ..dataset import ImageSet
from .base import Source, file_record, register

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFiles:
    """`read(i)`: image i of a list of files, decoded by Pillow to an RGB (3, H, W) uint8 tensor."""

    def __init__(self, paths: list[str]):
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum([len(e) for e in encoded])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def path(self, i: int) -> str:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.buffer[lo:hi].tobytes().decode("utf-8", "surrogateescape")

    def __call__(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = self.path(i)
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError, IndexError, struct.error, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: cannot decode the image ({exc})") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class ImageFolderSource(Source):
    channels = 3
    image_size = 224
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    train_lists: tuple[str, ...] = ("train.txt",)
    test_lists: tuple[str, ...] = ("test.txt", "val.txt")
    train_dirs: tuple[str, ...] = ("train",)
    test_dirs: tuple[str, ...] = ("test", "val")
    files = ("train/<class>/<image> + test/<class>/<image> (or val/), or train.txt + test.txt split lists",)

    # ------------------------------------------------------------------------------------------ layout
    @staticmethod
    def _first(path: Path, names: tuple[str, ...], kind: str) -> Path | None:
        for n in names:
            p = path / n
            if (p.is_file() if kind == "file" else p.is_dir()):
                return p
        return None

    def _layout(self, path: Path) -> tuple[str, Path, Path] | None:
        """('lists', train list, test list) or ('folders', train dir, test dir) or None."""
        train, test = self._first(path, self.train_lists, "file"), self._first(path, self.test_lists, "file")
        if train and test:
            return "lists", train, test
        train, test = self._first(path, self.train_dirs, "dir"), self._first(path, self.test_dirs, "dir")
        if train and test:
            return "folders", train, test
        return None

    def complete(self, path: Path) -> bool:
        return self._layout(path) is not None

    def count_classes(self, root: str | None) -> int:
        if self.num_classes:
            return self.num_classes
        folder = self.require(root)
        layout = self._layout(folder)
        if layout is None:
            raise DataError(f"{folder}: expected train/ and test/ class folders or split lists")
        kind, train, _ = layout
        if kind == "folders":
            return len(_class_dirs(train))
        _, labels, _ = self._read_list(train, folder, self.train_dirs, stat=False)
        return int(labels.max()) + 1 if len(labels) else 0

    # ------------------------------------------------------------------------------------------ reading
    def load(self, root, train, download=False):
        folder = self.require(root, download)
        layout = self._layout(folder)
        assert layout is not None  # require() returns complete folders only
        kind, train_src, test_src = layout
        if kind == "lists":
            paths, sizes, labels, names, read = self._from_lists(folder, train_src, test_src, train)
            tree = folder
        else:
            paths, sizes, labels, names = self._from_folders(train_src, test_src, train)
            read, tree = [], train_src if train else test_src
        if not self.num_classes:
            self.num_classes = len(names)
        provenance = {"folder": os.path.abspath(folder), "files": [file_record(f) for f in read], "layout": kind,
                      "tree": os.path.abspath(tree), "images": len(paths), "classes": len(names),
                      "listing_sha256": _listing_sha256(folder, paths, sizes)}
        return ImageSet(torch.from_numpy(labels), None, ImageFiles(paths), class_names=names,
                        image_size=self.image_size, channels=self.channels, provenance=provenance)

    def _from_folders(self, train_dir: Path, test_dir: Path, train: bool):
        classes = _class_dirs(train_dir)
        if not classes:
            raise DataError(f"{train_dir}: no class folders (expected {train_dir}/<class>/<image>)")
        if self.num_classes and len(classes) != self.num_classes:
            raise DataError(f"{train_dir}: {len(classes)} class folders, expected {self.num_classes} for "
                            f"{self.name}{self._list_hint()}")
        if not train:
            present = set(_class_dirs(test_dir))
            unknown = sorted(present - set(classes))
            if unknown:
                raise DataError(f"{test_dir}: class folders {unknown[:5]} are not in {train_dir}")
            absent = [c for c in classes if c not in present]
            if absent:
                raise DataError(f"{test_dir}: no folders for classes {absent[:5]} of {train_dir} (every class needs "
                                f"test images in {test_dir}/<class>/)")
        where = train_dir if train else test_dir
        paths, sizes, labels = [], [], []
        for label, name in enumerate(classes):
            found = _images_under(where / name)
            if not found:
                raise DataError(f"{where / name}: empty class folder (expected images with one of "
                                f"{', '.join(IMAGE_EXTENSIONS)})")
            paths += [p for p, _ in found]
            sizes += [n for _, n in found]
            labels += [label] * len(found)
        return paths, sizes, np.asarray(labels, dtype=np.int64), classes

    def _list_hint(self) -> str:
        own = [n for n in self.train_lists + self.test_lists if n not in ("train.txt", "test.txt", "val.txt")]
        return f" (or give split lists {' and '.join(own)})" if own else ""

    def _from_lists(self, folder: Path, train_list: Path, test_list: Path, train: bool):
        list_file = train_list if train else test_list
        paths, labels, sizes = self._read_list(list_file, folder, self.train_dirs if train else self.test_dirs)
        # class names from the train list, so that both splits name classes alike (its files were checked when
        # the train split was read)
        names_paths, names_labels, _ = ((paths, labels, sizes) if train else
                                        self._read_list(train_list, folder, self.train_dirs, stat=False))
        n = self.num_classes or int(max(names_labels.max(initial=-1), labels.max(initial=-1))) + 1
        if len(labels) and labels.max() >= n:
            raise DataError(f"{list_file}: labels must lie in 0..{n - 1}, found {int(labels.max())}")
        in_train, here = set(names_labels.tolist()), set(labels.tolist())
        if train and len(in_train) < n:
            absent = sorted(set(range(n)) - in_train)
            raise DataError(f"{train_list}: no images of labels {absent[:5]} (expected every label 0..{n - 1})")
        if not train and here != in_train:
            only_train, only_test = sorted(in_train - here), sorted(here - in_train)
            what = "; ".join(([f"no test images of labels {only_train[:5]} that {train_list.name} has"]
                              if only_train else []) +
                             ([f"labels {only_test[:5]} have no images in {train_list.name}"] if only_test else []))
            raise DataError(f"{test_list}: {what} (every class needs images in both splits)")
        names = [str(c) for c in range(n)]
        seen = set()
        for p, c in zip(names_paths, names_labels.tolist()):
            if c not in seen:
                seen.add(c)
                names[c] = Path(p).parent.name or str(c)
        read = [list_file] if train else [test_list, train_list]
        return paths, sizes, labels, names, read

    def _read_list(self, list_file: Path, folder: Path, split_dirs: tuple[str, ...], stat: bool = True):
        """(paths, labels, sizes) of a split list; with stat, every listed file must exist (sizes are None
        without)."""
        rel, labels, lines_of = [], [], []
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{list_file}: cannot read the split list ({exc})") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{list_file}:{number}: expected 'relative/path label', found {line!r}")
            label = int(parts[1])
            if label < 0 or (self.num_classes and label >= self.num_classes):
                hi = f"0..{self.num_classes - 1}" if self.num_classes else ">= 0"
                raise DataError(f"{list_file}:{number}: label {label} is out of range {hi}")
            rel.append(parts[0])
            labels.append(label)
            lines_of.append(number)
        if not rel:
            raise DataError(f"{list_file}: the split list names no images (expected 'relative/path label' lines)")
        base = next((b for b in [folder] + [folder / d for d in split_dirs] if (b / rel[0]).is_file()), None)
        if base is None:
            raise DataError(f"{list_file}:1: image {rel[0]} not found under {folder} "
                            f"(nor under {', '.join(str(folder / d) for d in split_dirs)})")
        paths = [str(base / r) for r in rel]
        sizes: list[int] | None = None
        if stat:
            sizes, missing = [], []
            for i, p in enumerate(paths):
                try:
                    sizes.append(os.stat(p).st_size)
                except OSError:
                    missing.append(i)
            if missing:
                first = missing[0]
                more = f" (and {len(missing) - 1} more listed images)" if len(missing) > 1 else ""
                raise DataError(f"{list_file}:{lines_of[first]}: image {rel[first]} not found under {base}{more}")
        elif not (base / rel[-1]).is_file():
            raise DataError(f"{list_file}: image {rel[-1]} (last line) not found under {base}")
        return paths, np.asarray(labels, dtype=np.int64), sizes


def _class_dirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _images_under(path: Path) -> list[tuple[str, int]]:
    """(path, size) of the images under path, in sorted order; the sizes go into the listing checksum."""
    out = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                p = os.path.join(dirpath, f)
                out.append((p, os.stat(p).st_size))
    return out


def _listing_sha256(folder: Path, paths: list[str], sizes: list[int] | None) -> str:
    """sha256 of the sorted `relative/path<TAB>size` lines of a split: it changes when a file is added, removed,
    renamed or rewritten with another size, without reading any image."""
    prefix = str(folder).rstrip(os.sep) + os.sep
    rel = [p[len(prefix):] if p.startswith(prefix) else p for p in paths]
    h = hashlib.sha256()
    for r, n in sorted(zip(rel, sizes or [0] * len(rel))):
        h.update(f"{r}\t{n}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- registered
@register
class GenericImageFolder(ImageFolderSource):
    """Any tree in the layout above, read from data.root itself; classes are counted from the files."""

    name = "imagefolder"
    num_classes = 0
    how_to_get = ("pass data.root=FOLDER holding train/<class>/<image> and test/<class>/<image> (or val/), or "
                  "train.txt and test.txt split lists of 'relative/path label' lines")

    def search_paths(self, root):
        return [Path(root).expanduser()] if root else []

    def missing_message(self, root):
        if not root:
            return "imagefolder: data.root must name the folder to read (the imagefolder source has no default place)"
        if not Path(root).expanduser().is_dir():
            return f"imagefolder: data.root={root} does not exist; {self.how_to_get}"
        return f"imagefolder: {root} does not hold a dataset in ImageFolder layout; {self.how_to_get}"


@register
class ImageNet100(ImageFolderSource):
    name = "imagenet100"
    num_classes = 100
    train_lists = ("train_100.txt", "train.txt")
    test_lists = ("val_100.txt", "test.txt", "val.txt")
    how_to_get = ("ImageNet-100 is a subset of ILSVRC-2012 (image-net.org, registration needed): put ImageNet's "
                  "train/ and val/ folders (val sorted into class folders) with the published split lists "
                  "train_100.txt and val_100.txt in DATA_ROOT/imagenet100, or a train/ and val/ tree of the 100 "
                  "classes, and pass data.root=DATA_ROOT")


@register
class ImageNet1000(ImageFolderSource):
    name = "imagenet1000"
    aliases = ("imagenet",)
    num_classes = 1000
    how_to_get = ("download ILSVRC-2012 from image-net.org (registration needed) and put its train/<wnid>/ and "
                  "val/<wnid>/ folders (val sorted into class folders) in DATA_ROOT/imagenet1000 (or "
                  "DATA_ROOT/imagenet), then pass data.root=DATA_ROOT")


@register
class DTD(ImageFolderSource):
    name = "dtd"
    num_classes = 47
    how_to_get = ("get DTD from www.robots.ox.ac.uk/~vgg/data/dtd and arrange it as DATA_ROOT/dtd/train/<class>/ "
                  "and DATA_ROOT/dtd/test/<class>/ (e.g. after its labels/train1.txt and test1.txt), then pass "
                  "data.root=DATA_ROOT")


@register
class GTSRB(ImageFolderSource):
    name = "gtsrb"
    num_classes = 43
    how_to_get = ("get GTSRB from benchmark.ini.rub.de and arrange it as DATA_ROOT/gtsrb/train/<class>/ and "
                  "DATA_ROOT/gtsrb/test/<class>/ (test images sorted by GT-final_test.csv), then pass "
                  "data.root=DATA_ROOT")


@register
class SVHN(ImageFolderSource):
    name = "svhn"
    num_classes = 10
    image_size = 32
    mean, std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)  # SVHN's train set, as commonly quoted
    how_to_get = ("SVHN's official files (ufldl.stanford.edu/housenumbers) are .mat: write its images as "
                  "DATA_ROOT/svhn/train/<digit>/ and DATA_ROOT/svhn/test/<digit>/ (label 10 is the digit 0), "
                  "then pass data.root=DATA_ROOT")


@register
class UCF101(ImageFolderSource):
    name = "ucf101"
    num_classes = 101
    how_to_get = ("arrange UCF101 frames (or the Visual Decathlon's ucf101 images) as DATA_ROOT/ucf101/train/<class>/ "
                  "and DATA_ROOT/ucf101/test/<class>/, then pass data.root=DATA_ROOT")


@register
class Flowers(ImageFolderSource):
    name = "flowers"
    num_classes = 102
    how_to_get = ("get Oxford 102 Flowers from www.robots.ox.ac.uk/~vgg/data/flowers/102 and arrange it as "
                  "DATA_ROOT/flowers/train/<class>/ and DATA_ROOT/flowers/test/<class>/ (after its setid.mat "
                  "split), then pass data.root=DATA_ROOT")
