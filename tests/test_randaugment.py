"""timm's RandAugment on uint8 batches (vitcl.data.randaugment) against timm 0.4.12's own PIL implementation."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import timm_reference
from vitcl.config import AugmentConfig
from vitcl.data import randaugment as ra
from vitcl.data.augment import BatchAugment, random_crop, random_hflip
from vitcl.errors import ConfigError

TIMM = timm_reference.load()
needs_timm = pytest.mark.skipif(TIMM is None, reason=timm_reference.HOW)
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
ALL_OPS = tuple(dict.fromkeys(ra.INCREASING_OPS + ra.STANDARD_OPS))
FILL = (124, 116, 104)


def images(n, H, W, C=3, seed=0):
    """Smooth images over random sub-ranges of the levels, with noise; a quarter of them uniform noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, C, 5, 6, generator=g), size=(H, W), mode="bicubic")
    lo = torch.randint(0, 100, (n, 1, 1, 1), generator=g)
    hi = torch.randint(150, 256, (n, 1, 1, 1), generator=g)
    span = x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True)
    x = lo + (hi - lo) * (x - x.amin((1, 2, 3), keepdim=True)) / span + 6 * torch.randn(x.shape, generator=g)
    x[: n // 4] = torch.randint(0, 256, x[: n // 4].shape, generator=g).float()
    return x.round().clamp(0, 255).to(torch.uint8)


def timm_op(name, img, level, sign, fill, interpolation):
    """timm's operation `name` at a fixed magnitude and sign on a uint8 (C, H, W) image; also its argument."""
    from PIL import Image

    TIMM._randomly_negate = (lambda v: -v) if sign < 0 else (lambda v: v)
    level_fn = TIMM.LEVEL_TO_ARG[name]
    args = level_fn(level, {"translate_const": 100}) if level_fn else ()
    pil = Image.fromarray(img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy())
    resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    if name.startswith("Posterize") and args[0] <= 0:  # Pillow >= 10 refuses 0 bits; older Pillow gave black
        out = torch.zeros_like(img)
    else:
        res = np.asarray(TIMM.NAME_TO_OP[name](pil, *args, fillcolor=fill if img.shape[0] > 1 else fill[0],
                                               resample=resample))
        out = torch.from_numpy(res.copy()).view(img.shape[1], img.shape[2], -1).permute(2, 0, 1)
    return out, (args[0] if args else None)


# ----------------------------------------------------------------------------------------------- the policy
def test_policy_string_is_parsed_as_timm_reads_it():
    p = ra.parse_policy("rand-m9-mstd0.5-inc1")
    assert (p.ops, p.num_layers, p.magnitude, p.magnitude_std, p.magnitude_max, p.prob, p.weights) == (
        ra.INCREASING_OPS, 2, 9.0, 0.5, 10.0, 0.5, None)
    p = ra.parse_policy("rand-n3-m7-mmax12-p0.8-mstd101-w0")
    assert p.ops == ra.STANDARD_OPS and (p.num_layers, p.magnitude, p.magnitude_max, p.prob) == (3, 7.0, 12.0, 0.8)
    assert math.isinf(p.magnitude_std) and p.weights == ra.W0
    assert ra.parse_policy("rand").magnitude == 10.0


@pytest.mark.parametrize("text", ["rand-m9-foo", "randaugment-m9", "m9-mstd0.5", "rand-m9-inc0", "rand-w1",
                                  "rand-p1.5", "rand-n0", "rand-m9.5", "rand-m9-m8", "rand-x3", ""])
def test_bad_policy_strings_are_config_errors(text):
    with pytest.raises(ConfigError, match=r"^data\.augment\.randaugment: "):
        ra.parse_policy(text)


def test_timm_and_kornia_randaugment_are_alternatives():
    from vitcl.runconfig import load_config

    with pytest.raises(ConfigError, match=r"^data\.augment\.randaugment: .*alternatives"):
        load_config(["replay/digits-b0inc2"], ["data.augment.randaugment=rand-m9-mstd0.5-inc1",
                                               "data.augment.randaugment_n=2"])


# -------------------------------------------------------------------------------------- operations vs timm
@needs_timm
@pytest.mark.parametrize("name", ALL_OPS)
def test_each_operation_matches_timm(name):
    """Colour ops: equal to timm within 1 grey level on >= 99% of pixels (they are exact here). Geometric ops:
    within 1 grey level everywhere and equal on >= 99.9% of pixels: both truncate the interpolated value, computed
    here in float64 from the same coordinates, so only a value within rounding error of an integer can differ."""
    interps = ("bilinear", "bicubic") if name in GEOMETRIC else ("bilinear",)
    cases = [(images(4, 32, 32, seed=1), FILL), (images(3, 24, 40, seed=2), FILL), (images(3, 20, 20, 1, 3), (90,))]
    for interp in interps:
        for x, fill in cases:
            for level in (0.0, 4.5, 10.0):
                for sign in (1.0, -1.0):
                    ref, arg = zip(*(timm_op(name, img, level, sign, fill, interp) for img in x))
                    mine_arg = ra.op_argument(name, torch.full((len(x),), level, dtype=torch.float64),
                                              torch.full((len(x),), sign, dtype=torch.float64))
                    if arg[0] is not None:
                        assert float(mine_arg[0]) == pytest.approx(arg[0], abs=1e-12)
                    out = ra.apply_op(name, x, mine_arg, fill, interp)
                    d = (out.int() - torch.stack(ref).int()).abs()
                    if name in GEOMETRIC:
                        assert int(d.max()) <= 1 and float((d == 0).float().mean()) >= 0.999, (interp, level, sign)
                    else:
                        assert float((d <= 1).float().mean()) >= 0.99, (level, sign)


@needs_timm
def test_sampling_matches_timm_over_many_draws():
    """Which ops, how often applied, and their arguments (magnitude and sign through timm's mappings): chi-square
    tests on the op counts and on the applied counts, a two-sample Kolmogorov-Smirnov test per op on its argument;
    fixed seeds, so the outcome is deterministic."""
    import random

    n_images = 20000
    policy = ra.parse_policy("rand-m9-mstd0.5-inc1")
    transform = TIMM.rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": FILL})
    TIMM._randomly_negate = lambda v: -v if random.random() > 0.5 else v  # restore timm's own
    record: list = []

    class Chosen:
        def __init__(self, op):
            self.op, self.name = op, op.aug_fn.__name__

        def __call__(self, img):
            record.append([self.op.name, False, None])
            return self.op(img)

    for op in transform.ops:
        op.name = [n for n, f in TIMM.NAME_TO_OP.items() if f is op.aug_fn and n in ra.INCREASING_OPS][0]
        op.aug_fn = lambda img, *args, **kw: record[-1].__setitem__(slice(1, 3), [True, args[0] if args else 0])
    transform.ops = [Chosen(op) for op in transform.ops]
    random.seed(0)
    np.random.seed(0)
    for _ in range(n_images):
        transform(None)
    assert len(record) == 2 * n_images
    mine = ra.sample(policy, n_images, generator=torch.Generator().manual_seed(0))
    op, applied = mine.op.flatten(), mine.applied.flatten()
    K = len(ra.INCREASING_OPS)
    t_counts = np.array([sum(r[0] == n for r in record) for n in ra.INCREASING_OPS])
    m_counts = torch.bincount(op, minlength=K).numpy()
    assert stats.chisquare(m_counts).pvalue > 1e-3  # uniform over the 15 ops
    assert stats.chi2_contingency(np.stack([t_counts, m_counts])).pvalue > 1e-3
    t_applied = np.array([sum(r[1] for r in record if r[0] == n) for n in ra.INCREASING_OPS])
    m_applied = torch.bincount(op[applied], minlength=K).numpy()
    assert stats.chi2_contingency(np.stack([t_applied, t_counts - t_applied, m_applied,
                                            m_counts - m_applied]).reshape(2, 2, K).sum(2)).pvalue > 1e-3
    assert stats.binomtest(int(m_applied.sum()), int(m_counts.sum()), 0.5).pvalue > 1e-3
    for k, name in enumerate(ra.INCREASING_OPS):
        if TIMM.LEVEL_TO_ARG[name] is None:
            continue
        t_args = np.array([r[2] for r in record if r[0] == name and r[1]])
        rows = applied & (op == k)
        m_args = ra.op_argument(name, mine.magnitude.flatten()[rows], mine.sign.flatten()[rows]).numpy()
        assert stats.ks_2samp(t_args, m_args).pvalue > 1e-3, name


def test_magnitudes_are_the_clipped_normal_of_mstd():
    draws = ra.sample(ra.parse_policy("rand-m9-mstd0.5-inc1"), 20000, generator=torch.Generator().manual_seed(1))
    m = draws.magnitude.flatten().numpy()
    assert m.max() == 10.0 and m.min() >= 0
    top = stats.norm.cdf(10, 9, 0.5)  # the mass above 10 is clipped onto 10
    assert stats.binomtest(int((m == 10).sum()), m.size, 1 - top).pvalue > 1e-3
    assert stats.kstest(m[m < 10], lambda v: stats.norm.cdf(v, 9, 0.5) / top).pvalue > 1e-3
    assert abs(float((draws.sign > 0).double().mean()) - 0.5) < 0.02
    fixed = ra.sample(ra.parse_policy("rand-m7-n3-p1"), 100)
    assert bool((fixed.magnitude == 7).all() and fixed.applied.all()) and fixed.op.shape == (3, 100)
    weighted = ra.sample(ra.parse_policy("rand-w0-n3"), 2000, generator=torch.Generator().manual_seed(2))
    assert bool((weighted.op[0] != weighted.op[1]).all() & (weighted.op[1] != weighted.op[2]).all())
    assert not bool(torch.isin(weighted.op, torch.tensor([2, 4])).any())  # Invert and Posterize weigh 0 in w0


# -------------------------------------------------------------------------------------------- batched use
def test_each_image_gets_its_own_operations_and_parameters():
    """The batched application equals applying each image's own draws to it alone."""
    x = images(24, 16, 16, seed=4)
    aug = ra.TimmRandAugment(ra.parse_policy("rand-m9-mstd0.5-inc1"), FILL, "bicubic")
    draws = ra.sample(aug.policy, 24, generator=torch.Generator().manual_seed(5))
    out = aug.apply(x, draws)
    for b in range(24):
        y = x[b:b + 1]
        for layer in range(2):
            if draws.applied[layer, b]:
                name = aug.policy.ops[int(draws.op[layer, b])]
                arg = ra.op_argument(name, draws.magnitude[layer, b:b + 1], draws.sign[layer, b:b + 1])
                y = ra.apply_op(name, y, arg, FILL, "bicubic")
        assert torch.equal(out[b], y[0])
    same = aug(x[:1].expand(64, -1, -1, -1), torch.Generator().manual_seed(6))
    assert len({bytes(o.flatten().tolist()) for o in same}) > 20


@pytest.mark.parametrize("kornia_n", [0, 2])
def test_crop_and_flip_on_uint8_equal_the_float_path(kornia_n):
    """Without timm's RandAugment, training batches are those of crop and flip on floats (then kornia's)."""
    x = torch.randint(0, 256, (32, 3, 12, 12), dtype=torch.uint8)
    cfg = AugmentConfig(crop_padding=4, hflip=True, randaugment_n=kornia_n, randaugment_m=27)
    aug = BatchAugment(cfg, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4), channels=3)
    torch.manual_seed(3)
    new = aug.train(x)
    torch.manual_seed(3)
    old = random_hflip(random_crop(x.float().div_(255), 4))
    if aug.randaugment is not None:
        old = aug.randaugment(old).clamp_(0, 1)
    assert torch.equal(new, aug.normalize(old))


def test_batch_augment_runs_timm_randaugment_on_grey_and_rgb_with_the_mean_as_fill():
    for c in (1, 3):
        cfg = AugmentConfig(crop_padding=2, hflip=True, randaugment="rand-m9-mstd0.5-inc1")
        aug = BatchAugment(cfg, (0.5,), (0.5,), channels=c)
        assert aug.timm_randaugment is not None and aug.timm_randaugment.fill == (128,) * c
        x = torch.randint(0, 256, (8, c, 16, 16), dtype=torch.uint8)
        a = aug.train(x, torch.Generator().manual_seed(0))
        assert torch.equal(a, aug.train(x, torch.Generator().manual_seed(0))) and a.shape == x.shape
