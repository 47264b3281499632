import pytest
import torch

from vitcl.config import AugmentConfig
from vitcl.data.augment import BatchAugment, mix_batch, random_crop, random_hflip, smooth_one_hot


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    out = random_crop(x, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(16):
        windows = [padded[b, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)


def test_hflip_flips_about_half_and_keeps_the_rest():
    torch.manual_seed(0)
    x = torch.rand(400, 1, 4, 4)
    out = random_hflip(x)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped | kept).all()) and 150 < int(flipped.sum()) < 250


def test_smooth_one_hot_matches_timm_definition():
    t = smooth_one_hot(torch.tensor([2, 0]), 4, 0.1)
    off = 0.1 / 4
    assert torch.allclose(t[0], torch.tensor([off, off, 1 - 0.1 + off, off]))
    assert torch.allclose(t.sum(1), torch.ones(2))


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_mix_batch_targets_are_the_lambda_mix_of_the_pair(mixup, cutmix):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    cfg = AugmentConfig(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1)
    xm, soft, lam = mix_batch(x, y, 5, cfg)
    t = smooth_one_hot(y, 5, 0.1)
    assert torch.allclose(soft, lam * t + (1 - lam) * t.flip(0))
    if mixup:
        assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0))
    else:  # each pixel comes from the image or its pair, and the pasted share is 1 - lambda
        from_pair = (xm == x.flip(0)) & (xm != x)
        assert torch.all((xm == x) | (xm == x.flip(0)))
        assert abs(from_pair[0, 0].float().mean().item() - (1 - lam)) < 1e-6


def test_test_transform_normalises_with_given_statistics():
    aug = BatchAugment(AugmentConfig(), (0.5,), (0.25,), channels=3)
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(aug.test(x), torch.full((1, 3, 2, 2), 2.0))


def test_train_transform_runs_randaugment_on_grey_and_rgb():
    torch.manual_seed(0)
    for c in (1, 3):
        aug = BatchAugment(AugmentConfig(crop_padding=2, hflip=True, randaugment_n=2), (0.5,), (0.5,), channels=c)
        out = aug.train(torch.randint(0, 256, (4, c, 16, 16), dtype=torch.uint8))
        assert out.shape == (4, c, 16, 16) and torch.isfinite(out).all()


def test_randaugment_fill_is_the_mean_unless_given():
    from vitcl.data.augment import BatchAugment
    from vitcl.errors import ConfigError
    from vitcl.runconfig import load_config

    mean = (0.5071, 0.4867, 0.4408)
    default = BatchAugment(AugmentConfig(randaugment="rand-m9-mstd0.5-inc1"), mean, (0.2, 0.2, 0.2), 3)
    assert default.timm_randaugment.fill == (129, 124, 112)
    given = BatchAugment(AugmentConfig(randaugment="rand-m9-mstd0.5-inc1", randaugment_fill=[124, 116, 104]),
                         mean, (0.2, 0.2, 0.2), 3)
    assert given.timm_randaugment.fill == (124, 116, 104)
    with pytest.raises(ConfigError, match="data.augment.randaugment_fill"):
        BatchAugment(AugmentConfig(randaugment="rand-m9-mstd0.5-inc1", randaugment_fill=[1, 2]), mean, mean, 3)
    cfg, _ = load_config(["dytox/cifar100-b0inc10"])  # DyTox's code fills with ImageNet's mean on CIFAR too
    assert cfg.data.augment.randaugment_fill == [124, 116, 104]
    with pytest.raises(ConfigError, match="^data.augment.randaugment_fill: expected uint8"):
        load_config(["dytox/cifar100-b0inc10"], ["data.augment.randaugment_fill=[300, 0, 0]"])
