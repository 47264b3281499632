"""Dataset sources in their standard formats. Importing fills the SOURCES registry."""
from . import digits  # noqa: F401  (registration)
from . import metadata_only  # noqa: F401,E402  (after the real readers: registers only the missing names)
from .base import SOURCES, Remote, Source, get_source, md5sum

__all__ = ["SOURCES", "Remote", "Source", "get_source", "md5sum"]
