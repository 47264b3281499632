"""Dataset sources in their standard formats. Importing fills the SOURCES registry."""
from . import cifar, digits, idx, imagefolder, pilot  # noqa: F401  (registration)
from .base import SOURCES, Remote, Source, get_source, md5sum, register

__all__ = ["SOURCES", "Remote", "Source", "get_source", "md5sum", "register"]
