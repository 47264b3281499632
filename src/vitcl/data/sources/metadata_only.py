"""Metadata-only stand-ins for sources whose readers live elsewhere (CIFAR-100, ImageNet-100, ImageNet-1000):
enough to build models and count parameters (`vitcl params` builds scenarios with shapes_only), nothing to train
on. Each is registered only when no real source of that name is, so the real readers take precedence."""
from __future__ import annotations

from ...errors import DataError
from .base import SOURCES, Source


class _MetadataOnly(Source):
    def locate(self, root):
        return None

    def load(self, root, train, download=False):
        raise DataError(f"{self.name}: this build has only the metadata of {self.name} (class count, image size), "
                        f"not its reader")


class Cifar100Metadata(_MetadataOnly):
    name = "cifar100"
    num_classes = 100
    channels = 3
    image_size = 32
    mean = (0.5071, 0.4867, 0.4408)
    std = (0.2675, 0.2565, 0.2761)


class ImageNet100Metadata(_MetadataOnly):
    name = "imagenet100"
    num_classes = 100
    channels = 3
    image_size = 224
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)


class ImageNet1000Metadata(ImageNet100Metadata):
    name = "imagenet1000"
    num_classes = 1000


for _cls in (Cifar100Metadata, ImageNet100Metadata, ImageNet1000Metadata):
    if _cls.name not in SOURCES:
        SOURCES.register(_cls.name)(_cls)
