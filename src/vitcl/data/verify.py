"""Decode every image of a data set once, listing the files that fail (`vitcl datasets --verify NAME`)."""
from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .dataset import ImageSet
from .sources import Source


class _Decode(Dataset):
    """Item i: "" when image i decodes, else the DataError's message (returned, not raised, so that one bad file
    neither stops the pass nor arrives wrapped in a worker's traceback)."""

    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> str:
        assert self.images.read is not None  # lazy sets only
        try:
            self.images.read(i)
        except DataError as exc:
            return str(exc)
        return ""


def verify(source: Source, root: str | None, workers: int = 2,
           progress: Callable[[str, int, int], None] | None = None) -> tuple[int, list[str]]:
    """(images checked, failure messages) over the train and test splits. A split whose files cannot be read at
    all (a corrupt IDX file, a list naming missing images) is one failure; data that is not found at all is the
    DataError of `require`, raised."""
    source.require(root)
    checked, failures = 0, []
    for split, train in (("train", True), ("test", False)):
        try:
            images = source.load(root, train=train)
        except DataError as exc:
            failures.append(str(exc))
            continue
        total = len(images)
        if images.in_memory:  # read and parsed whole by load
            checked += total
            if progress:
                progress(split, total, total)
            continue
        loader = DataLoader(_Decode(images), batch_size=32, num_workers=workers, collate_fn=list)
        done = 0
        for batch in loader:
            failures += [m for m in batch if m]
            done += len(batch)
            if progress:
                progress(split, done, total)
        checked += total
    return checked, failures
