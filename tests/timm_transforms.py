"""timm 0.4.12's ImageNet transforms (`timm/data/transforms.py` and `transforms_factory.py`), loaded from the same
place as timm_reference.py finds timm, for comparisons with vitcl.data.crops.

timm's code imports torchvision for a few PIL-level operations. When torchvision is installed it is used; else a
stand-in module supplies the operations these two files call, transcribed from torchvision 0.10's
`transforms.functional_pil` (the release timm 0.4.12 was used with): Resize(int) sets the short side and truncates
the long one (`int(size * long / short)`), and leaves an image whose short side already has that size unchanged;
CenterCrop's offsets are `int(round((H - h) / 2.0))`; resized_crop is PIL's crop then resize. The crop boxes, the
random draws and the eval sizes under test are timm's own code in every case."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import types
import zipfile
from pathlib import Path

import timm_reference

MEMBERS = ("timm/data/constants.py", "timm/data/transforms.py", "timm/data/transforms_factory.py")


def _read(member: str) -> str:
    """A file of timm 0.4.12: from the installed package when it is that version, else from the wheel."""
    try:
        installed = importlib.metadata.version("timm") == timm_reference.VERSION
    except importlib.metadata.PackageNotFoundError:
        installed = False
    spec = importlib.util.find_spec("timm") if installed else None
    if spec is not None and spec.submodule_search_locations:
        return (Path(list(spec.submodule_search_locations)[0]).parent / member).read_text()
    wheel = Path(os.environ.get("VITCL_TIMM_WHEEL_DIR", Path.home() / ".cache" / "vitcl")) / timm_reference.WHEEL
    with zipfile.ZipFile(wheel) as z:
        return z.read(member).decode()


def _stand_in() -> types.ModuleType:
    """The torchvision pieces timm's transforms call, on PIL images (see the module docstring)."""
    from PIL import Image

    def resize(img, size, interpolation=Image.BILINEAR):
        w, h = img.size
        if isinstance(size, int):
            if (w <= h and w == size) or (h <= w and h == size):
                return img
            ow, oh = (size, int(size * h / w)) if w < h else (int(size * w / h), size)
            return img.resize((ow, oh), interpolation)
        return img.resize(tuple(size[::-1]), interpolation)

    def crop(img, top, left, height, width):
        return img.crop((left, top, left + width, top + height))

    def center_crop(img, output_size):
        th, tw = (output_size, output_size) if isinstance(output_size, int) else output_size
        w, h = img.size
        return crop(img, int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)), th, tw)

    def resized_crop(img, top, left, height, width, size, interpolation=Image.BILINEAR):
        return resize(crop(img, top, left, height, width), size, interpolation)

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize, functional.crop = resize, crop
    functional.center_crop, functional.resized_crop = center_crop, resized_crop

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

        def __call__(self, img):
            for t in self.transforms:
                img = t(img)
            return img

    class Resize:
        def __init__(self, size, interpolation=Image.BILINEAR):
            self.size, self.interpolation = size, interpolation

        def __call__(self, img):
            return resize(img, self.size, self.interpolation)

    class CenterCrop:
        def __init__(self, size):
            self.size = size

        def __call__(self, img):
            return center_crop(img, self.size)

    class Unused:  # flips, colour jitter, ToTensor and Normalize: never reached with the settings under test
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, img):
            raise NotImplementedError("not part of the stand-in")

    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    transforms.Compose, transforms.Resize, transforms.CenterCrop = Compose, Resize, CenterCrop
    for name in ("RandomHorizontalFlip", "RandomVerticalFlip", "ColorJitter", "ToTensor", "Normalize"):
        setattr(transforms, name, Unused)
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    return torchvision


def load() -> types.ModuleType | None:
    """A module with timm's transforms_imagenet_train, transforms_imagenet_eval and
    RandomResizedCropAndInterpolation, or None without timm 0.4.12."""
    if timm_reference._source() is None:
        return None
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.transforms",
                                             "torchvision.transforms.functional")}
    if importlib.util.find_spec("torchvision") is None:
        tv = _stand_in()
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms,
                            "torchvision.transforms.functional": tv.transforms.functional})
    try:
        ns: dict = {}
        for member in MEMBERS:
            src = _read(member)
            # the factory's package imports, pointed at what is loaded here
            src = src.replace("from timm.data.constants import", "from __timm_ns__ import")
            src = src.replace("from timm.data.auto_augment import rand_augment_transform, augment_and_mix_transform, "
                              "auto_augment_transform\n", "")
            src = src.replace("from timm.data.transforms import", "from __timm_ns__ import")
            src = src.replace("from timm.data.random_erasing import RandomErasing\n", "RandomErasing = None\n")
            shim = types.ModuleType("__timm_ns__")
            shim.__dict__.update(ns)
            sys.modules["__timm_ns__"] = shim
            exec(compile(src, member, "exec"), ns)
        module = types.ModuleType("timm_transforms_0_4_12")
        module.__dict__.update(ns)
        return module
    finally:
        sys.modules.pop("__timm_ns__", None)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
