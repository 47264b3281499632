"""timm's RandAugment, per image, batched on the device on uint8 images.

The policy strings, operations, constants and magnitude-to-parameter mappings are those of timm 0.4.12's
`timm/data/auto_augment.py` (the version DyTox pins), plus the `mmax` and `p` sections and `mstd` > 100 of later
timm versions; the pixel arithmetic is Pillow's (ImageOps, ImageEnhance, Image.transform), which timm calls. Each
image draws its own `n` operations (uniformly with replacement; without replacement, weighted, under `w0`), applies
each with probability `p`, with its own magnitude and sign; each layer then makes one pass per family of operations
over the images that drew one of them, with per-image parameters. docs/methods/dytox.md#randaugment lists the facts
and the tolerances against timm's own implementation.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .transfer import device_tensor, to_device

MAX_LEVEL = 10.0  # timm's _MAX_LEVEL: magnitudes are on a 0..10 scale
KEY = "data.augment.randaugment"

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS (inc1), in timm's order
STANDARD_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# timm's _RAND_CHOICE_WEIGHTS_0 (w0), read by position in STANDARD_OPS whichever list is used, as timm does
W0 = (0.025, 0.005, 0.0, 0.3, 0.0, 0.005, 0.005, 0.025, 0.005, 0.005, 0.025, 0.2, 0.2, 0.1, 0.1)
SIGNED = frozenset({"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})  # timm's _randomly_negate
TRANSLATE_PCT = 0.45  # timm's default translate_pct

Interpolation = Literal["bilinear", "bicubic"]


@dataclass(frozen=True)
class RandAugmentPolicy:
    ops: tuple[str, ...] = INCREASING_OPS
    num_layers: int = 2
    magnitude: float = 10.0
    magnitude_std: float = 0.0  # inf: uniform in [0, magnitude]
    magnitude_max: float = MAX_LEVEL
    prob: float = 0.5
    weights: tuple[float, ...] | None = None  # choice without replacement, with these weights


def parse_policy(text: str, key: str = KEY) -> RandAugmentPolicy:
    """A timm RandAugment string such as `rand-m9-mstd0.5-inc1`: sections m, n, mstd, inc1, mmax, p, w0."""
    expected = ("expected a timm RandAugment policy such as 'rand-m9-mstd0.5-inc1': 'rand' then '-'-separated "
                "sections m<int>, n<int>, mstd<float>, inc1, mmax<int>, p<float>, w0")
    parts = str(text).split("-")
    if parts[0] != "rand":
        raise ConfigError(f"{key}: {expected}; got {text!r}")
    values: dict[str, str] = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d[\d.]*)", part)
        if not match or match.group(1) in values:
            raise ConfigError(f"{key}: section {part!r} of {text!r}: {expected}")
        values[match.group(1)] = match.group(2)
    unknown = set(values) - {"m", "n", "mstd", "inc", "mmax", "p", "w"}
    if unknown:
        raise ConfigError(f"{key}: unknown section {sorted(unknown)[0]!r} in {text!r}; {expected}")
    try:
        m = float(int(values.get("m", "10")))
        n = int(values.get("n", "2"))
        std = float(values.get("mstd", "0"))
        mmax = float(int(values.get("mmax", "10")))
        p = float(values.get("p", "0.5"))
        w = int(values["w"]) if "w" in values else None
    except ValueError as e:
        raise ConfigError(f"{key}: {text!r}: m, n, mmax and w take integers, mstd and p numbers") from e
    if "inc" in values and values["inc"] != "1":
        # timm reads the section with bool(str): inc0 would select the increasing ops too
        raise ConfigError(f"{key}: {text!r}: timm reads any 'inc' section as inc1; write inc1, or leave it out "
                          "for the standard operations")
    if n < 1 or not 0 <= p <= 1 or (w is not None and w != 0):
        raise ConfigError(f"{key}: {text!r}: expected n >= 1, p in [0, 1] and only w0 (timm's one weight set)")
    ops = INCREASING_OPS if "inc" in values else STANDARD_OPS
    weights = W0 if w is not None else None
    if weights is not None and n > sum(v > 0 for v in weights):
        raise ConfigError(f"{key}: {text!r}: w0 picks distinct operations, at most {sum(v > 0 for v in W0)}")
    return RandAugmentPolicy(ops, n, m, math.inf if std > 100 else std, mmax, p, weights)


@dataclass
class Draws:
    """Per layer and image (both (num_layers, B)): operation index, applied, magnitude (clipped), sign (+1/-1)."""

    op: torch.Tensor
    applied: torch.Tensor
    magnitude: torch.Tensor
    sign: torch.Tensor


def sample(policy: RandAugmentPolicy, batch: int, device: torch.device | str = "cpu",
           generator: torch.Generator | None = None) -> Draws:
    L, K = policy.num_layers, len(policy.ops)
    if policy.weights is None:
        op = torch.randint(0, K, (L, batch), device=device, generator=generator)
    else:
        w = torch.tensor(policy.weights, dtype=torch.float64, device=device).expand(batch, K)
        op = torch.multinomial(w, L, replacement=False, generator=generator).T.contiguous()
    applied = torch.rand(L, batch, device=device, generator=generator, dtype=torch.float64) < policy.prob
    m = torch.full((L, batch), policy.magnitude, dtype=torch.float64, device=device)
    if math.isinf(policy.magnitude_std):
        m = torch.rand(L, batch, device=device, generator=generator, dtype=torch.float64) * policy.magnitude
    elif policy.magnitude_std > 0:
        m = m + policy.magnitude_std * torch.randn(L, batch, device=device, generator=generator, dtype=torch.float64)
    m = m.clamp(0.0, policy.magnitude_max)
    sign = torch.where(torch.rand(L, batch, device=device, generator=generator) < 0.5, 1.0, -1.0).double()
    return Draws(op, applied, m, sign)


def op_argument(name: str, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """timm's level-to-argument mapping (float64, per image): degrees, bits, threshold, addend, factor, shear, pct."""
    r = level / MAX_LEVEL
    s = sign if name in SIGNED else torch.ones_like(sign)
    if name == "Rotate":
        return s * r * 30.0
    if name == "Posterize":
        return torch.floor(r * 4)
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(r * 4)
    if name == "Solarize":
        return torch.floor(r * 256)
    if name == "SolarizeIncreasing":
        return 256 - torch.floor(r * 256)
    if name == "SolarizeAdd":
        return torch.floor(r * 110)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return r * 1.8 + 0.1
    if name.endswith("Increasing"):  # the enhance ops
        return 1.0 + s * r * 0.9
    if name in ("ShearX", "ShearY"):
        return s * r * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return s * r * TRANSLATE_PCT
    return torch.zeros_like(level)  # AutoContrast, Equalize, Invert take none


class TimmRandAugment:
    """RandAugment of a uint8 batch (B, C, H, W), C = 1 or 3; fill: one uint8 value per channel (timm's img_mean)."""

    def __init__(self, policy: RandAugmentPolicy, fill: tuple[int, ...], interpolation: Interpolation = "bilinear"):
        self.policy = policy
        self.fill = tuple(int(v) for v in fill)
        self.interpolation = interpolation

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The draws come from `generator` (on its device), else from the host's global generator: which operation
        each image gets decides which kernels run, so it is drawn where it is read, and a batch on a GPU is
        augmented without waiting for the GPU."""
        draws = sample(self.policy, x.shape[0], generator.device if generator is not None else "cpu", generator)
        return self.apply(x, draws)

    def apply(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Each layer in one pass per family over the images that drew one of its operations: one table lookup (the
        level maps), one blend (the enhance ops), one affine resampling per axis set (the geometric ops)."""
        x = x.clone()
        ops, on = self.policy.ops, draws.op.device  # the draws' device: the host's unless a generator said
        for layer in range(self.policy.num_layers):
            chosen = torch.where(draws.applied[layer], draws.op[layer], -1).tolist()  # a device read only if `on` is
            for family in FAMILIES:
                picks = [(b, ops[k]) for b, k in enumerate(chosen) if k >= 0 and ops[k] in family]
                if not picks:
                    continue
                rows = device_tensor([b for b, _ in picks], on)
                names = [name for _, name in picks]
                arg = torch.zeros(len(picks), dtype=torch.float64, device=on)
                for name in sorted(set(names)):
                    at = device_tensor([n == name for n in names], on)
                    arg = torch.where(at, op_argument(name, draws.magnitude[layer, rows], draws.sign[layer, rows]), arg)
                rows = to_device(rows, x.device)
                x[rows] = apply_family(names, x[rows], to_device(arg, x.device), self.fill, self.interpolation)
        return x


LUT_OPS = frozenset({"AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize",
                     "SolarizeIncreasing", "SolarizeAdd"})
BLEND_OPS = frozenset({"Color", "ColorIncreasing", "Contrast", "ContrastIncreasing", "Brightness",
                       "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing"})
GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
# the geometric ops by the axes they interpolate along (affine samples one axis with fewer taps)
X_OPS, Y_OPS = frozenset({"ShearX", "TranslateXRel"}), frozenset({"ShearY", "TranslateYRel"})
FAMILIES = (LUT_OPS, BLEND_OPS, frozenset({"Rotate"}), X_OPS, Y_OPS)


def apply_family(names: list[str], x: torch.Tensor, arg: torch.Tensor, fill: tuple[int, ...],
                 interpolation: Interpolation) -> torch.Tensor:
    """Image i of x through operation names[i] (all of one family) with argument arg[i], in one pass."""
    def where(name: str, value: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        at = device_tensor([n == name for n in names], x.device).view(-1, *[1] * (value.dim() - 1))
        return torch.where(at, value, current)

    kinds = sorted(set(names))
    if kinds[0] in GEOMETRIC_OPS:
        matrix = torch.zeros(len(names), 6, dtype=torch.float64, device=x.device)
        for name in kinds:
            matrix = where(name, geometry_matrix(name, arg, x.shape[-2:]), matrix)
        # each family resamples along its own axes: known from the names, not read from the matrix
        axes = "x" if set(kinds) <= X_OPS else "y" if set(kinds) <= Y_OPS else "xy"
        return affine(x, matrix, fill, interpolation, axes)
    if kinds[0] in BLEND_OPS:
        degenerate = x
        for name in kinds:
            degenerate = where(name, blend_source(name, x), degenerate)
        return blend(degenerate, x, arg)
    lut = torch.arange(256, device=x.device).expand(x.shape[0], x.shape[1], 256)
    for name in kinds:
        lut = where(name, level_table(name, x, arg), lut)
    return _lut(x, lut)


def apply_op(name: str, x: torch.Tensor, arg: torch.Tensor, fill: tuple[int, ...] = (128, 128, 128),
             interpolation: Interpolation = "bilinear") -> torch.Tensor:
    """One operation on a uint8 batch with one argument per image (op_argument's units)."""
    if name in GEOMETRIC_OPS:
        return affine(x, geometry_matrix(name, arg, x.shape[-2:]), fill, interpolation)
    if name in BLEND_OPS:
        return blend(blend_source(name, x), x, arg)
    return _lut(x, level_table(name, x, arg))


def level_table(name: str, x: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """The level map (B, C, 256) of a point operation of Pillow's ImageOps or timm's solarize_add."""
    B, C = x.shape[:2]
    i = torch.arange(256, device=x.device).expand(B, C, 256)
    a = to_device(arg, x.device).view(-1, 1, 1)
    if name == "AutoContrast":
        return autocontrast_table(x)
    if name == "Equalize":
        return equalize_table(x)
    if name == "Invert":
        return 255 - i
    if name.startswith("Posterize"):  # keep the top `arg` bits (0: black; 8 or more: unchanged, as timm)
        keep = a.clamp(0, 8).long()
        return i & (256 - torch.pow(2, 8 - keep))
    if name == "SolarizeAdd":  # levels below 128 get `arg` more, capped at 255
        return torch.where(i < 128, (i + a.long()).clamp_max(255), i)
    if name.startswith("Solarize"):  # levels at or above the threshold are inverted
        return torch.where(i < a.long(), i, 255 - i)
    raise ValueError(f"unknown RandAugment operation {name!r}")


def blend_source(name: str, x: torch.Tensor) -> torch.Tensor:
    """The degenerate image ImageEnhance blends with: greyscale (Color), the flat rounded grey mean (Contrast),
    black (Brightness), SMOOTH-filtered (Sharpness)."""
    if name.startswith("Color"):  # a single-channel image is its own greyscale
        return grey(x).to(torch.uint8).expand_as(x)
    if name.startswith("Contrast"):
        g = grey(x)
        mean = torch.floor(g.sum(dim=(1, 2, 3), dtype=torch.int64).double() / g[0].numel() + 0.5)
        return _per_image(mean).to(torch.uint8).expand_as(x)
    if name.startswith("Brightness"):
        return torch.zeros_like(x)
    if name.startswith("Sharpness"):
        return smooth(x)
    raise ValueError(f"unknown RandAugment operation {name!r}")


# ------------------------------------------------------------------------------------------------ colour ops
def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) uint8 through per-image, per-channel tables lut (B, C, 256)."""
    B, C, H, W = x.shape
    return lut.to(torch.uint8).gather(2, x.reshape(B, C, H * W).long()).view(B, C, H, W)


def autocontrast_table(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0): each channel's [lo, hi] stretched to [0, 255] by int(i * scale + offset)."""
    lo = x.amin(dim=(2, 3)).double()[..., None]
    hi = x.amax(dim=(2, 3)).double()[..., None]
    i = torch.arange(256, dtype=torch.float64, device=x.device)
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp_min(1)  # a true division: `255 / t` is 255 * (1 / t)
    lut = torch.trunc(i * scale - lo * scale).clamp(0, 255)
    return torch.where(hi > lo, lut, i).long()


def equalize_table(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: lut[i] = (step // 2 + count below i) // step, step = (N - count of the top level) // 255."""
    B, C, H, W = x.shape
    flat = x.reshape(B * C, H * W).long() + 256 * torch.arange(B * C, device=x.device)[:, None]
    hist = torch.bincount(flat.flatten(), minlength=B * C * 256).view(B, C, 256)
    top = torch.where(hist > 0, torch.arange(256, device=x.device), -1).amax(2, keepdim=True)
    step = (H * W - hist.gather(2, top)) // 255
    below = hist.cumsum(2) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(0, 255)
    return torch.where(step > 0, lut, torch.arange(256, device=x.device))


def grey(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB-to-L conversion, (19595 R + 38470 G + 7471 B + 2^15) >> 16, as int32 (B, 1, H, W)."""
    if x.shape[1] == 1:
        return x.int()
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16)[:, None]


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, x, factor): degenerate + factor (x - degenerate) in float32, truncated, clipped."""
    d = degenerate.float()
    out = d + _per_image(factor.float()) * (x.float() - d)
    return out.clamp_(0, 255).to(torch.uint8)


def smooth(x: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH: 3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, rounded; the border pixels are kept."""
    B, C, H, W = x.shape
    if H < 3 or W < 3:
        return x
    v = x.reshape(B * C, 1, H, W).float()
    box = F.avg_pool2d(v, 3, stride=1, divisor_override=1)  # exact integer sums in float32
    s = (box + 4 * v[:, :, 1:-1, 1:-1]).long()
    out = x.reshape(B * C, 1, H, W).clone()
    out[:, :, 1:-1, 1:-1] = ((2 * s + 13) // 26).to(torch.uint8)
    return out.view(B, C, H, W)


# ---------------------------------------------------------------------------------------------- geometry ops
def geometry_matrix(name: str, arg: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Pillow's affine data (a, b, c, d, e, f) per image, float64 (B, 6): output (x, y) samples (ax+by+c, dx+ey+f)."""
    H, W = int(size[0]), int(size[1])
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if name == "ShearX":
        return torch.stack([one, arg, zero, zero, one, zero], 1)
    if name == "ShearY":
        return torch.stack([one, zero, zero, arg, one, zero], 1)
    if name == "TranslateXRel":
        return torch.stack([one, zero, arg * W, zero, one, zero], 1)
    if name == "TranslateYRel":
        return torch.stack([one, zero, zero, zero, one, arg * H], 1)
    if name == "Rotate":  # Image.rotate about the centre (W/2, H/2), its cos and sin rounded to 15 decimals
        angle = -torch.deg2rad(arg)
        c, s = torch.round(torch.cos(angle), decimals=15), torch.round(torch.sin(angle), decimals=15)
        cx, cy = W / 2.0, H / 2.0
        return torch.stack([c, s, c * -cx + s * -cy + cx, -s, c, -s * -cx + c * -cy + cy], 1)
    raise ValueError(f"unknown RandAugment operation {name!r}")


def _cubic(v1, v2, v3, v4, d):
    """Pillow's BICUBIC macro (the a = -1 cubic convolution) in its Horner form, which keeps flat regions exact."""
    p4 = (v2 - v1).sub_(v3).add_(v4)
    p3 = (v1 - v2).mul_(2).add_(v3).sub_(v4)
    return p4.mul_(d).add_(p3).mul_(d).add_(v3 - v1).mul_(d).add_(v2)


def _interpolate(v: list[torch.Tensor], d: torch.Tensor) -> torch.Tensor:
    if len(v) == 1:
        return v[0]
    if len(v) == 2:  # Pillow's BILINEAR macro
        return v[0] + (v[1] - v[0]).mul_(d)
    return _cubic(v[0], v[1], v[2], v[3], d)


def affine(x: torch.Tensor, matrix: torch.Tensor, fill: tuple[int, ...],
           interpolation: Interpolation = "bilinear", axes: str | None = None) -> torch.Tensor:
    """Image.transform(AFFINE) of each image by its own matrix, as Pillow samples it: output pixel centres mapped
    through the matrix; a point outside [0, W) x [0, H) takes the fill, one inside is interpolated from its
    neighbours (indices clamped to the image) and truncated to uint8. `axes` ("x", "y", "xy"): those along which
    a sample may fall between pixels; None reads it from the matrix (a device read)."""
    B, C, H, W = x.shape
    dev = x.device
    xs = torch.arange(W, dtype=torch.float64, device=dev) + 0.5
    ys = torch.arange(H, dtype=torch.float64, device=dev) + 0.5
    m = to_device(matrix, dev, torch.float64).view(B, 6, 1, 1)
    xin = m[:, 0] * xs[None, None, :] + m[:, 1] * ys[None, :, None] + m[:, 2]  # (B, H, W)
    yin = m[:, 3] * xs[None, None, :] + m[:, 4] * ys[None, :, None] + m[:, 5]
    inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    xin, yin = xin - 0.5, yin - 0.5
    x0, y0 = torch.floor(xin), torch.floor(yin)
    dx, dy = xin - x0, yin - y0
    taps = (0, 1) if interpolation == "bilinear" else (-1, 0, 1, 2)
    # a zero fraction gives the tap at 0 exactly, in both forms: shear and translation along x have dy = 0 (and
    # along y dx = 0) everywhere, so they need one row (column) of taps
    # (more taps than needed give the same pixels: a zero fraction weighs the others by exactly 0)
    x_taps = taps if ("x" in axes if axes is not None else bool((dx != 0).any())) else (0,)
    y_taps = taps if ("y" in axes if axes is not None else bool((dy != 0).any())) else (0,)
    flat = x.reshape(B, C, H * W).double()  # float64 as Pillow: float32 would flip the truncation of ~1% of pixels
    xi = [(x0 + t).clamp(0, W - 1).long() for t in x_taps]
    rows = []
    for t in y_taps:
        yi = (y0 + t).clamp(0, H - 1).long() * W
        v = [flat.gather(2, (yi + xj).view(B, 1, H * W).expand(B, C, H * W)) for xj in xi]
        rows.append(_interpolate(v, dx.view(B, 1, H * W)))
    out = _interpolate(rows, dy.view(B, 1, H * W))
    out = out.clamp_(0, 255).to(torch.uint8).view(B, C, H, W)
    fill_t = device_tensor(fill[:C] if len(fill) >= C else fill * C, dev, torch.uint8).view(1, C, 1, 1)
    return torch.where(inside[:, None], out, fill_t)
