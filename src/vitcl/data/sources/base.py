"""The source interface: a dataset in its standard on-disk format, read into an ImageSet."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ...errors import DataError
from ...registry import Registry
from ..dataset import ImageSet

SOURCES: Registry = Registry("dataset")


@dataclass(frozen=True)
class Remote:
    """A file at its official address with its checksum."""

    url: str
    filename: str
    md5: str


class Source:
    """Subclasses set the class attributes and implement `load`; `locate` finds the files."""

    name: str = ""
    num_classes: int = 0
    channels: int = 3
    image_size: int = 32
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    files: tuple[str, ...] = ()  # paths, relative to the dataset folder, that must exist
    remotes: tuple[Remote, ...] = ()
    how_to_get: str = ""  # one sentence for the error when the files are missing

    def search_paths(self, root: str | None) -> list[Path]:
        paths = []
        if root:
            paths += [Path(root) / self.name, Path(root)]
        env = os.environ.get("VITCL_DATA")
        if env:
            paths.append(Path(env) / self.name)
        paths += [Path.home() / ".cache" / "vitcl" / self.name, Path("/usr/share/datasets") / self.name]
        return paths

    def locate(self, root: str | None) -> Path | None:
        for path in self.search_paths(root):
            if self.files and all((path / f).exists() for f in self.files):
                return path
        return None

    def require(self, root: str | None, download: bool = False) -> Path:
        found = self.locate(root)
        if found is not None:
            return found
        if download and self.remotes:
            return self.download(self.search_paths(root)[0] if root else self.search_paths(None)[-2])
        where = ", ".join(str(p) for p in self.search_paths(root))
        hint = self.how_to_get or (
            "run with data.download=true when online" if self.remotes else "place the files there")
        raise DataError(f"{self.name}: files not found (looked in {where}); {hint}")

    def download(self, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        for remote in self.remotes:
            target = dest / remote.filename
            if target.exists() and md5sum(target) == remote.md5:
                continue
            print(f"downloading {remote.url} -> {target}", flush=True)
            fd, tmp = tempfile.mkstemp(dir=dest, suffix=".part")
            try:
                with urllib.request.urlopen(remote.url, timeout=60) as response, os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(response, out)
            except OSError as exc:
                Path(tmp).unlink(missing_ok=True)
                raise DataError(f"{self.name}: download of {remote.url} failed ({exc})") from None
            if md5sum(Path(tmp)) != remote.md5:
                Path(tmp).unlink(missing_ok=True)
                raise DataError(f"{self.name}: {remote.url} does not match its md5 {remote.md5}")
            os.replace(tmp, target)
            self.unpack(target, dest)
        return dest

    def unpack(self, archive: Path, dest: Path) -> None:
        """Extract a downloaded archive when the format needs it (tarballs)."""

    def load(self, root: str | None, train: bool, download: bool = False) -> ImageSet:
        raise NotImplementedError


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def get_source(name: str, key: str = "data.dataset") -> Source:
    return SOURCES.get(name, key)()
