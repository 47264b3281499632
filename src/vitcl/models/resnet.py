"""ResNets of the papers' CNN baselines: ResNet-18 (CIFAR or ImageNet stem) and the CIFAR ResNet-32
(He et al. 2016, option-A shortcuts, 0.46M parameters, as in iCaRL/PODNet/DER)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from .registry import register_model

Stem = Literal["cifar", "imagenet"]  # cifar: 3x3 conv, no max-pool; imagenet: 7x7/2 conv + max-pool


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by the stride and zero-pad the new channels (no parameters)."""

    def __init__(self, planes: int, stride: int):
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.planes - x.shape[1]
        return torch.nn.functional.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "conv", bn_affine: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, affine=bn_affine)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, affine=bn_affine)
        self.relu = nn.ReLU(inplace=True)
        self.out_relu = True  # False on the last block of a ResNet built with last_relu=False
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = PadShortcut(planes, stride) if shortcut == "pad" else nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, affine=bn_affine))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward_preact(x)
        return self.relu(out) if self.out_relu else out

    def forward_preact(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output before its final ReLU (residual sum)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + (x if self.downsample is None else self.downsample(x))


class ResNet(nn.Module):
    """Layout names follow torchvision (conv1, bn1, layer1..4) so its state dicts load by key.

    bn_affine=False drops BatchNorm's scale and shift (the RKR / Mask-RKR ResNets: their parameter counts, 11.17M
    for ResNet-18, have none); running statistics stay. last_relu=False leaves the last block's output without its
    ReLU (UCIR's and PODNet's feature extractors: features of both signs for a cosine classifier)."""

    def __init__(self, blocks: list[int], widths: list[int], in_chans: int = 3, stem: Stem = "cifar",
                 shortcut: str = "conv", bn_affine: bool = True, last_relu: bool = True):
        super().__init__()
        if stem not in get_args(Stem):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        w0 = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, w0, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_chans, w0, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(w0, affine=bn_affine)
        self.relu = nn.ReLU(inplace=True)
        layers, in_planes = [], w0
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                block = BasicBlock(in_planes, w, stride if j == 0 else 1, shortcut, bn_affine)
                block.out_relu = last_relu or not (i == len(blocks) - 1 and j == n - 1)
                stage.append(block)
                in_planes = w
            layers.append(nn.Sequential(*stage))
        for i, layer in enumerate(layers):
            setattr(self, f"layer{i + 1}", layer)
        self.num_stages = len(layers)
        self.num_features = in_planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward_stages(self, x: torch.Tensor, last_relu: bool = True,
                       split_last_block: bool = False) -> list[torch.Tensor]:
        """The output of every stage (layer1, layer2, ...), in order; the last one is what `forward_features`
        returns. last_relu=False: the last block's output before its ReLU (PODNet's and UCIR's reference
        networks); split_last_block: the last block's output as a stage of its own, after the rest of the last
        stage (PODNet's CIFAR ResNet-32 `stage_4`)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(self.num_stages):
            blocks = list(getattr(self, f"layer{i + 1}"))
            last = i == self.num_stages - 1
            for j, block in enumerate(blocks):
                if last and j == len(blocks) - 1:
                    if split_last_block and j > 0:
                        outs.append(x)
                    x = block.forward_preact(x)
                    if last_relu and block.out_relu:
                        x = self.relu(x)
                else:
                    x = block(x)
            outs.append(x)
        return outs

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def checkpoint_filter_fn(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchvision's and timm's names are ours; BatchNorm's step counters go where this model keeps none."""
        own = self.state_dict()
        return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked") or k in own}


@dataclass
class ResNet18Options:
    name: str = "resnet18"
    stem: Stem = "cifar"
    width: int = 64
    bn_affine: bool = True  # false: BatchNorm without scale/shift (the RKR papers' ResNets)
    last_relu: bool = True  # false: no ReLU on the last block's output (UCIR)
    pretrained: str | None = None  # a local torchvision/timm state dict (see models/pretrained.py)


@dataclass
class ResNet32Options:
    name: str = "resnet32"
    width: int = 16
    bn_affine: bool = True
    last_relu: bool = True
    pretrained: str | None = None


@register_model("resnet18")
class ResNet18(ResNet):
    """The ResNet of this layout, built from its options (the general ResNet takes blocks and widths)."""

    Options = ResNet18Options

    @classmethod
    def from_options(cls, opts: ResNet18Options, img_size: int, in_chans: int) -> ResNet18:
        w = opts.width
        return cls([2, 2, 2, 2], [w, 2 * w, 4 * w, 8 * w], in_chans, opts.stem, bn_affine=opts.bn_affine,
                   last_relu=opts.last_relu)


@register_model("resnet32")
class ResNet32(ResNet):
    Options = ResNet32Options

    @classmethod
    def from_options(cls, opts: ResNet32Options, img_size: int, in_chans: int) -> ResNet32:
        w = opts.width
        return cls([5, 5, 5], [w, 2 * w, 4 * w], in_chans, "cifar", shortcut="pad", bn_affine=opts.bn_affine,
                   last_relu=opts.last_relu)
