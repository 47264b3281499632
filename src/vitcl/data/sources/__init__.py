"""Dataset sources in their standard formats. Importing fills the SOURCES registry."""
from . import digits  # noqa: F401  (registration)
from .base import SOURCES, Remote, Source, get_source, md5sum

from .catalog import register_missing  # noqa: E402

register_missing()  # shape-only entries for the datasets no reader above registered (keep this last)

__all__ = ["SOURCES", "Remote", "Source", "get_source", "md5sum"]
