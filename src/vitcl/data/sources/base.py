"""The source interface: a dataset in its standard on-disk format, read into an ImageSet.

Where a source looks for its files (the first folder that holds them all wins):
- with data.root set, only under it: `<data.root>/<name>` (and `<data.root>/<alias>`, `<data.root>/<folder>` for the
  source's other folder names), then `<data.root>` itself.
  A root that lacks the files is an error naming what is missing, never a silent fall-back to another copy;
- without data.root, the search path: `$VITCL_DATA/<name>` when that variable is set, then
  `/usr/share/datasets/<name>` (where Debian's `dataset-*` packages install), then `~/.cache/vitcl/<name>`.
When none holds them and `data.download=true`, a source with official addresses downloads them (checked against
their md5) into `<data.root>/<name>`, or into the cache when no root is given.

Files found on disk are not checked against the md5 of the official archives: repackaged copies (Debian's are
recompressed) are fine as long as their content parses; each reader validates what it reads. What a load read is
kept on the ImageSet (`provenance`: the folder, and path, size and md5 of each file) so that a run can record it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ...errors import DataError
from ...registry import Registry
from ..dataset import ImageSet

SOURCES: Registry = Registry("dataset")
SYSTEM_DIR = Path("/usr/share/datasets")


@dataclass(frozen=True)
class Remote:
    """A file at its official address with its checksum; `mirrors` are tried in order when the first fails."""

    url: str
    filename: str
    md5: str
    mirrors: tuple[str, ...] = ()


class Source:
    """Subclasses set the class attributes and implement `load`; `locate` finds the files."""

    name: str = ""
    aliases: tuple[str, ...] = ()  # other registered names (and folder names) of the same dataset
    folders: tuple[str, ...] = ()  # more folder names, not registered (another toolbox's layout, e.g. vtab-cil/vtab)
    num_classes: int = 0
    channels: int = 3
    image_size: int = 32
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    files: tuple[str, ...] = ()  # paths, relative to the dataset folder, that must exist
    remotes: tuple[Remote, ...] = ()
    how_to_get: str = ""  # one sentence for the error when the files are missing
    origin: str = ""  # what the data set is and who made it (shown by `vitcl datasets`)

    # ------------------------------------------------------------------------------------------ finding files
    def search_paths(self, root: str | None) -> list[Path]:
        """Candidate dataset folders, in lookup order."""
        names = (self.name, *self.aliases, *self.folders)
        paths: list[Path] = []
        if root:  # a root given by the user is the only place looked in
            base = Path(root).expanduser()
            paths += [base / n for n in names] + [base]
        else:
            env = os.environ.get("VITCL_DATA")
            if env:
                paths += [Path(env).expanduser() / n for n in names]
            paths += [SYSTEM_DIR / n for n in names]
            paths.append(self.cache_dir())
        out: list[Path] = []
        for p in paths:
            if p not in out:
                out.append(p)
        return out

    def cache_dir(self) -> Path:
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vitcl" / self.name

    def download_dir(self, root: str | None) -> Path:
        """Where `download` puts the files: `<root>/<name>`, or the user cache without a root."""
        return Path(root).expanduser() / self.name if root else self.cache_dir()

    def complete(self, path: Path) -> bool:
        """Whether folder `path` holds everything this source reads."""
        return bool(self.files) and all((path / f).is_file() for f in self.files)

    def missing_files(self, path: Path) -> list[str]:
        """The files of `files` that folder `path` lacks, as named in messages."""
        return [f for f in self.files if not (path / f).is_file()]

    def locate(self, root: str | None) -> Path | None:
        for path in self.search_paths(root):
            if path.is_dir() and self.complete(path):
                return path
        return None

    def get_hint(self, root: str | None = None) -> str:
        """How to obtain the files, in one sentence."""
        hint = self.how_to_get.rstrip(", ")
        if self.remotes:
            where = self.remotes[0].url.rsplit("/", 1)[0]
            hint = (hint + ", or " if hint else "") + (f"run with data.download=true to fetch it from {where} "
                                                       f"into {self.download_dir(root)}")
        return hint or "place the files there"

    def missing_message(self, root: str | None) -> str:
        if root:
            return self._missing_under_root(root)
        where = ", ".join(str(p) for p in self.search_paths(root))
        need = f" (expected {', '.join(self.files)})" if self.files else ""
        return f"{self.name}: files not found{need}; looked in {where}; {self.get_hint()}"

    def shortfall(self, root: str) -> str:
        """What a given data.root lacks: the candidate folder closest to complete and its missing files."""
        base = Path(root).expanduser()
        if not base.is_dir():
            return f"{base} {'is not a folder' if base.exists() else 'does not exist'}"
        folders = [p for p in self.search_paths(root) if p.is_dir()]
        best = min(folders, key=lambda p: len(self.missing_files(p)))
        others = [str(p) for p in self.search_paths(root) if p != best and p not in folders]
        what = f"{best} lacks {', '.join(self.missing_files(best))}"
        if others:
            what += f" ({', '.join(others)} {'does' if len(others) == 1 else 'do'} not exist)"
        return what

    def _missing_under_root(self, root: str) -> str:
        what = self.shortfall(root)
        hint = self.get_hint(root)
        elsewhere = self.locate(None)
        if elsewhere is not None:
            hint += f", or leave data.root unset to read the copy at {elsewhere}"
        return (f"{self.name}: files not found under data.root={root} (the only place looked in when data.root is "
                f"set): {what}; {hint}")

    def require(self, root: str | None, download: bool = False) -> Path:
        found = self.locate(root)
        if found is not None:
            return found
        if download and self.remotes:
            dest = self.download(self.download_dir(root))
            if self.complete(dest):
                return dest
            raise DataError(f"{self.name}: downloaded into {dest}, but it still lacks some of {', '.join(self.files)}")
        raise DataError(self.missing_message(root))

    # ------------------------------------------------------------------------------------------ downloading
    def download(self, dest: Path) -> Path:
        """Fetch every remote into dest (skipping files already there with the right md5), check, unpack.

        A failed or mismatching download leaves nothing behind: the partial file is removed, and so is dest when
        this call created it and it is still empty."""
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"{self.name}: cannot create {dest.parent} for the download ({exc.strerror})") from None
        with _exclusive(dest.parent / f".{dest.name}.download-lock"):  # one process downloads; the others wait
            if dest.is_dir() and self.files and self.complete(dest):
                return dest  # another process finished it meanwhile
            created = not dest.exists()
            try:
                dest.mkdir(exist_ok=True)
                for remote in self.remotes:
                    target = dest / remote.filename
                    if target.is_file() and md5sum(target) == remote.md5:
                        continue
                    self._fetch(remote, target)
                    self.unpack(target, dest)
            except BaseException:
                if created and dest.is_dir() and not any(dest.iterdir()):
                    dest.rmdir()
                raise
        return dest

    def _fetch(self, remote: Remote, target: Path) -> None:
        errors = []
        for url in (remote.url, *remote.mirrors):
            print(f"{self.name}: downloading {url} -> {target}", file=sys.stderr, flush=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{remote.filename}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, out, 1 << 20)
                got = md5sum(Path(tmp))
                if got != remote.md5:
                    errors.append(f"{url} has md5 {got}, expected {remote.md5}")
                    continue
                os.replace(tmp, target)
                return
            except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors; ValueError: a bad URL
                errors.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
            finally:
                Path(tmp).unlink(missing_ok=True)
        raise DataError(f"{self.name}: download of {remote.filename} failed ({'; '.join(errors)})")

    def unpack(self, archive: Path, dest: Path) -> None:
        """Extract a downloaded archive when the format needs it (tarballs)."""

    # ------------------------------------------------------------------------------------------ reading
    def count_classes(self, root: str | None) -> int:
        """Number of classes, without reading images (sources whose class count depends on the files override)."""
        return self.num_classes

    def load(self, root: str | None, train: bool, download: bool = False) -> ImageSet:
        raise NotImplementedError


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An exclusive file lock (POSIX flock) held for the block, so that several ranks or runs starting together
    do not download and unpack into the same folder at once. The lock file is removed afterwards."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_record(path: Path) -> dict:
    """Path, size and md5 of a file a source read, for the run's data record; md5 so that it compares with the
    checksums data sets publish."""
    return {"path": os.path.abspath(path), "bytes": path.stat().st_size, "md5": md5sum(path)}


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def extract_tar(archive: Path, dest: Path) -> None:
    """Extract a tarball into dest, refusing members that would land outside it."""
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
                return
            base = dest.resolve()
            for member in tar.getmembers():
                target = (dest / member.name).resolve()
                if base != target and base not in target.parents or member.issym() or member.islnk():
                    raise DataError(f"{archive}: refusing to extract {member.name!r} (outside {dest} or a link)")
            tar.extractall(dest)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: cannot extract the archive ({exc})") from None


def register(cls: type[Source]) -> type[Source]:
    """Register a source class under its name and its aliases."""
    for key in (cls.name, *cls.aliases):
        SOURCES.register(key)(cls)
    return cls


def get_source(name: str, key: str = "data.dataset") -> Source:
    return SOURCES.get(name, key)()
