"""Shape-only entries for datasets whose readers are not part of this module: class count, channels, image size
and normalisation, enough for `vitcl params` (build_scenario(..., shapes_only=True)) and for presets to validate.
Loading one says how to get a reader. A name that a real reader registers first is left to it (see the end of
sources/__init__.py), so these entries step aside once the CIFAR pickle and ImageFolder readers are present."""
from __future__ import annotations

from ...errors import DataError
from .base import SOURCES, Source

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# name: (classes, image size, mean, std, how to get it)
CATALOG = {
    "cifar100": (100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                 "the CIFAR-100 python pickles from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "imagenet1000": (1000, 224, IMAGENET_MEAN, IMAGENET_STD,
                     "an ImageFolder tree (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) of ILSVRC-2012"),
    # the seed's sequence of datasets (Visual Decathlon subsets), as ImageFolder trees
    "dtd": (47, 224, IMAGENET_MEAN, IMAGENET_STD, "an ImageFolder tree (train/, test/) of the Describable Textures"),
    "gtsrb": (43, 224, IMAGENET_MEAN, IMAGENET_STD, "an ImageFolder tree (train/, test/) of GTSRB"),
    "svhn": (10, 224, IMAGENET_MEAN, IMAGENET_STD, "an ImageFolder tree (train/, test/) of SVHN"),
    "ucf101": (101, 224, IMAGENET_MEAN, IMAGENET_STD,
               "an ImageFolder tree (train/, test/) of UCF101 dynamic images (Visual Decathlon)"),
    "flowers": (102, 224, IMAGENET_MEAN, IMAGENET_STD,
                   "an ImageFolder tree (train/, test/) of the Oxford (VGG) Flowers-102"),
    "fashion-mnist": (10, 28, (0.2860,), (0.3530,),
                      "the IDX files (`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets)"),
}
ALIASES = {"imagenet": "imagenet1000"}


class ShapeOnly(Source):
    def locate(self, root):
        return None

    def load(self, root, train, download=False):
        raise DataError(f"{self.name}: this build knows only the dataset's shape (for `vitcl params`); reading it "
                        f"needs the dataset readers (CIFAR pickles / ImageFolder) and {self.how_to_get}")


def register_missing() -> None:
    for name, (n, size, mean, std, how) in {**CATALOG, **{a: CATALOG[t] for a, t in ALIASES.items()}}.items():
        if name in SOURCES:
            continue
        cls = type(f"ShapeOnly_{name}", (ShapeOnly,), {"name": name, "num_classes": n, "channels": len(mean),
                                                       "image_size": size, "mean": mean, "std": std,
                                                       "how_to_get": f"needs {how}"})
        SOURCES.register(name)(cls)
