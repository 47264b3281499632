"""The benchmarks of class-incremental learning on pretrained ViTs, as APER (Zhou et al., "Revisiting Class-Incremental
Learning with Pre-Trained Models", IJCV 2024) releases them and the LAMDA-PILOT toolbox reads them: ImageFolder trees
`train/<class>/<image>` and `test/<class>/<image>`, classes in sorted folder order (torchvision's ImageFolder, which
PILOT's utils/data.py uses at sun-hailong/LAMDA-PILOT@3450184), no split lists.

The archives are on Google Drive / OneDrive only (links from APER's README, zhoudw-zdw/RevisitingCIL@017ef24): they
cannot be fetched by a script, so `data.download` does not apply. Their md5s are published in an issue of that
repository (LAMDA-CL/RevisitingCIL#5), for checking the archive by hand (`md5sum`); the unpacked trees are not
checked against anything beyond their layout and class count, as for every ImageFolder source (imagefolder.py).

CIFAR-100 at 224 px, the seventh benchmark of those tables, is the `cifar100` source with data.image_size: 224
(configs/data/cifar100-224-b0inc5.yaml).
"""
from __future__ import annotations

from .base import register
from .imagefolder import ImageFolderSource

APER = "APER's README (github.com/zhoudw-zdw/RevisitingCIL)"


def _drive(file_id: str) -> str:
    return f"https://drive.google.com/file/d/{file_id}/view"


def _onedrive(share: str) -> str:
    return f"https://entuedu-my.sharepoint.com/:u:/g/personal/n2207876b_e_ntu_edu_sg/{share}"


class PilotBenchmark(ImageFolderSource):
    """One of APER's released trees; `archive`/`md5` name the released file and its published checksum."""

    train_dirs = ("train",)
    test_dirs = ("test", "val")
    archive: str = ""
    md5: str = ""
    links: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        where = " or ".join(cls.links)
        folder = cls.name  # or a folder of `folders` (PILOT's layout)
        cls.how_to_get = (f"download {cls.archive} (md5 {cls.md5}, published in LAMDA-CL/RevisitingCIL#5) from "
                          f"{where} (the links of {APER}; no scripted download), unpack it so that "
                          f"DATA_ROOT/{folder}/train/<class>/ and DATA_ROOT/{folder}/test/<class>/ exist, and pass "
                          f"data.root=DATA_ROOT")


@register
class ImageNetR(PilotBenchmark):
    name = "imagenet-r"
    num_classes = 200
    archive, md5 = "imagenet-r.zip", "730aa3fb9c7d2ec0b6381c6b23040681"
    links = (_drive("1SG4TbiL8_DooekztyCVK8mPmfhMo8fkR"),
             _onedrive("EU4jyLL29CtBsZkB6y-JSbgBzWF5YHhBAUz1Qw8qM2954A?e=hlWpNW"))
    origin = ("ImageNet-R (Hendrycks et al., ICCV 2021: renditions of 200 ImageNet classes), split into train/test "
              "by APER, as L2P/DualPrompt/CODA-Prompt and LAMDA-PILOT use it")


@register
class ImageNetA(PilotBenchmark):
    name = "imagenet-a"
    num_classes = 200
    archive, md5 = "ina.zip", "7f4aaf0b1532b7a0bd670822c152d3c5"
    links = (_drive("19l52ua_vvTtttgVRziCZJjal0TPE9f2p"),
             _onedrive("ERYi36eg9b1KkfEplgFTW3gBg1otwWwkQPSml0igWBC46A?e=NiTUkL"))
    origin = ("ImageNet-A (Hendrycks et al., CVPR 2021: 200 ImageNet classes, natural adversarial examples), split "
              "into train/test by APER")


@register
class CUB200(PilotBenchmark):
    name = "cub200"
    aliases = ("cub",)  # PILOT's folder name (./data/cub)
    num_classes = 200
    archive, md5 = "cub.zip", "85e342a2d5f941e740193602057df7a5"
    links = (_drive("1XbUpnWpJPnItt5zQ6sHJnsjPncnNLvWb"),
             _onedrive("EVV4pT9VJ9pBrVs2x0lcwd0BlVQCtSrdbLVfhuajMry-lA?e=L6Wjsc"))
    origin = "CUB-200-2011 (Wah et al., 2011: 200 bird species), as APER's processed release splits it"


@register
class ObjectNet(PilotBenchmark):
    name = "objectnet"
    num_classes = 200
    archive, md5 = "objnet.tgz", "63ff7443a47bd682016a8ec59b8cc1bc"
    links = (_onedrive("EZFv9uaaO1hBj7Y40KoCvYkBnuUZHnHnjMda6obiDpiIWw?e=4n8Kpy"),)
    origin = ("a 200-class subset of ObjectNet (Barbu et al., NeurIPS 2019: 313 classes of objects photographed in "
              "unusual poses and scenes), sampled by APER; its README also lists the subset's files, for building "
              f"the tree from ObjectNet itself: {_drive('147Mta-HcENF6IhZ8dvPnZ93Romcie7T6')}")


@register
class OmniBenchmark(PilotBenchmark):
    name = "omnibenchmark"
    num_classes = 300
    archive, md5 = "omnibenchmark.zip", "f1c30808a707f9197c6c811ea52e5cbb"
    links = (_drive("1AbCP3zBMtv_TDXJypOCnOgX8hJmvJm3u"),
             _onedrive("EcoUATKl24JFo3jBMnTV2WcBwkuyBH0TmCAy6Lml1gOHJA?e=eCNcoA"))
    origin = "a 300-class subset of OmniBenchmark (Zhang et al., ECCV 2022: 21 semantic realms), sampled by APER"


@register
class VTAB(PilotBenchmark):
    name = "vtab"
    folders = ("vtab-cil/vtab",)  # PILOT's path (./data/vtab-cil/vtab)
    num_classes = 50
    archive, md5 = "vtab.zip", "a9c37bde6105a2516c900b0c33a437c1"
    links = (_drive("1xUiwlnx4k0oDhYi26KL5KwrCAya-mvJ_"),
             _onedrive("EQyTP1nOIH5PrfhXtpPgKQ8BlEFW2Erda1t7Kdi3Al-ePw?e=Yt4RnV"))
    origin = ("50 classes from 5 VTAB tasks (Zhai et al., 2019), 10 classes each: RESISC45, DTD, Oxford Pets, "
              "EuroSAT and Flowers102, as APER selects them (LAMDA-PILOT shuffles the 50 classes with seed 1993; "
              "RanPAC keeps their folder order, shuffle=False in its args/vtab_publish.csv)")
