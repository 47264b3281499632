"""LeViT and CoaT through timm (`model.name: levit`, `coat`), and the parameter counts that the ViT, LeViT, CoaT and
CCT configs state in their header comments (LVT's 8.9M on CIFAR-100, the Fashion-MNIST benchmark's 0.7M). The timm
tests skip, saying why, where timm does not import even with the tests' torchvision stand-in (conftest.py)."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from torchvision_standin import timm_importable
from vitcl.cli import main, param_rows
from vitcl.errors import ConfigError
from vitcl.models import create_backbone
from vitcl.models.coat import CoaTOptions
from vitcl.models.levit import LeViTOptions, small_stem
from vitcl.runconfig import load_config

WHY = timm_importable()
needs_timm = pytest.mark.skipif(WHY is not None, reason=WHY or "")
BASE = Path(__file__).resolve().parents[1] / "src" / "vitcl" / "configs" / "base"
TINY_LEVIT = LeViTOptions(embed_dim=[16, 24, 32], depth=[1, 1, 1], num_heads=[2, 2, 2], key_dim=8)
TINY_COAT = CoaTOptions(embed_dims=[16, 16, 16, 16], serial_depths=[1, 1, 1, 1], parallel_depth=1)


def stated_count(config: str) -> int:
    """The exact parameter count a base config's header comment states ("8,915,684 at 32 px" / "(688,074 parameters")."""
    lines = (BASE / f"{config}.yaml").read_text().splitlines()
    header = " ".join(line.lstrip("# ") for line in lines if line.startswith("#"))
    counts = re.findall(r"(\d{1,3}(?:,\d{3})+) (?:parameters|at 32 px)", header)
    assert counts, f"base/{config}.yaml states no count"
    return int(counts[0].replace(",", ""))


def total(preset: str, config: str) -> int:
    cfg, _ = load_config([preset, f"base/{config}"])
    rows, _ = param_rows(cfg)
    return int(rows[-1]["total"])


COUNTED = {"cifar": ("er/cifar100-5tasks-m200", None), "cifar-8.9m": ("er/cifar100-5tasks-m200", 8.9e6),
           "fmnist-0.7m": ("er/fashion-mnist-b0inc2", 701_178)}


def check_counts(family: str) -> None:
    for suffix, (preset, target) in COUNTED.items():
        config = f"{family}-{suffix}"
        if not (BASE / f"{config}.yaml").exists():
            continue
        n = total(preset, config)
        assert n == stated_count(config), config
        if target is not None:
            # LVT's 8.9M to its stated precision; the Fashion-MNIST rows within 5% of the ResNet-18 of width 16
            assert abs(n - target) / target < (0.01 if suffix == "cifar-8.9m" else 0.05), (config, n)


@pytest.mark.parametrize("family", ["vit", "cct"])
def test_our_backbones_counts_match_their_configs(family):
    check_counts(family)
    assert (BASE / f"{family}-fmnist-0.7m.yaml").exists() and (BASE / f"{family}-cifar-8.9m.yaml").exists()


@needs_timm
@pytest.mark.parametrize("family", ["levit", "coat"])
def test_timm_backbones_counts_match_their_configs(family):
    check_counts(family)
    assert all((BASE / f"{family}-{s}.yaml").exists() for s in COUNTED)


def test_vit_cifar_is_vit_lite_7_4():
    """ViT-Lite-7/4 of the CCT paper (its Table: 3.72M parameters with a 10-class head)."""
    cfg, _ = load_config(["er/cifar100-5tasks-m200", "base/vit-cifar"])
    model = create_backbone(cfg.model, 32, 3)
    assert abs(sum(p.numel() for p in model.parameters()) + 256 * 10 + 10 - 3.72e6) / 3.72e6 < 0.005


@needs_timm
@pytest.mark.parametrize("opts, width", [(LeViTOptions(), 384), (TINY_LEVIT, 32), (CoaTOptions(), 152),
                                         (TINY_COAT, 16), (CoaTOptions(embed_dims=[16, 16, 32, 32], parallel_depth=0,
                                                                       serial_depths=[1, 1, 1, 1]), 32)])
@pytest.mark.parametrize("chans", [1, 3])
def test_output_is_pooled_features_at_32_px(opts, width, chans):
    model = create_backbone(opts, 32, chans).eval()
    x = torch.randn(2, chans, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, width) and model.num_features == width
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), out)


@needs_timm
def test_levit_stem_gives_8x8_tokens_and_is_timms_stem_cut_short():
    from timm.layers import get_act_layer
    from timm.models.levit import ConvNorm, Stem16

    model = create_backbone(LeViTOptions(), 32, 3)
    assert model.stem(torch.randn(1, 3, 32, 32)).shape == (1, 128, 8, 8)
    # at stride 16 the builder gives timm's own stem: same names, same shapes, so the shorter ones are its prefix
    ours = small_stem(3, 128, 16, ConvNorm, get_act_layer("hard_swish"))
    theirs = Stem16(3, 128, act_layer=get_act_layer("hard_swish"))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    short = small_stem(3, 128, 4, ConvNorm, nn.Hardswish)
    assert [m.linear.out_channels for m in short if isinstance(m, ConvNorm)] == [64, 128]
    assert create_backbone(LeViTOptions(stem_stride=16), 32, 3).stem.__class__ is Stem16


@needs_timm
def test_coat_scales_at_patch_2_are_16_8_4_2():
    model = create_backbone(CoaTOptions(), 32, 3)
    grids = [getattr(model, f"patch_embed{i}").grid_size for i in range(1, 5)]
    assert grids == [(16, 16), (8, 8), (4, 4), (2, 2)]


@needs_timm
def test_timm_backbones_train(tmp_path):
    for opts in (TINY_LEVIT, TINY_COAT):
        model = create_backbone(opts, 16, 1)
        model(torch.randn(2, 1, 16, 16)).sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), opts.name


TINY_RUN = ["data.train_per_class=12", "data.test_per_class=6", "data.image_size=16", "train.epochs=1",
            "train.batch_size=16", "memory.size=20", "eval.batch_size=64", "run.threads=1"]


@needs_timm
@pytest.mark.parametrize("model", [
    ["model.name=levit", "model.embed_dim=[16,24,32]", "model.depth=[1,1,1]", "model.num_heads=[2,2,2]",
     "model.key_dim=8"],
    ["model.name=coat", "model.embed_dims=[16,16,16,16]", "model.serial_depths=[1,1,1,1]", "model.parallel_depth=1"],
])
def test_tiny_er_run_through_the_cli(tmp_path, model):
    assert main(["run", "-q", "er/digits-b0inc2", *model, *TINY_RUN, f"run.out_dir={tmp_path}", "run.name=r"]) == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert len(res["class_il"]["acc_matrix"]) == 5
    cfg = (tmp_path / "r" / "config.yaml").read_text()
    assert f"name: {model[0].split('=')[1]}" in cfg


@pytest.mark.parametrize("opts", [LeViTOptions(), CoaTOptions()])
def test_missing_timm_is_a_one_line_error(monkeypatch, opts):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ConfigError, match=rf"model.name: '{opts.name}' needs .*pip install 'vitcl\[timm\]'") as err:
        create_backbone(opts, 32, 3)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("model.depth=[2,3]", "model.depth"), ("model.stem_stride=3", "model.stem_stride"),
    ("model.key_dim=200", "model.key_dim"),
])
def test_levit_options_are_checked(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(["er/cifar100-5tasks-m200-levit"], [override])


@pytest.mark.parametrize("override, key", [
    ("model.num_heads=4", "model.num_heads"), ("model.embed_dims=[64,128,128,256]", "model.embed_dims"),
    ("model.serial_depths=[2,2]", "model.serial_depths"),
])
def test_coat_options_are_checked(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(["er/cifar100-5tasks-m200-coat"], [override])


def test_fmnist_backbone_presets_are_er_with_the_equal_count_backbones():
    base, _ = load_config(["er/fashion-mnist-b0inc2"])
    for family in ("vit", "levit", "coat", "cct"):
        cfg, _ = load_config([f"er/fashion-mnist-b0inc2-{family}"])
        assert cfg.model.name == family and cfg.method == base.method and cfg.train == base.train
        assert cfg.memory == base.memory and cfg.data == base.data


@pytest.mark.parametrize("split", ["5tasks-m200", "10tasks-m500", "20tasks-m200"])
def test_cifar_backbone_presets_are_er_with_the_8_9m_backbones(split):
    base, _ = load_config([f"er/cifar100-{split}"])
    for family in ("vit", "levit", "coat", "cct"):  # cvt's configs come with its model
        cfg, _ = load_config([f"er/cifar100-{split}-{family}"])
        want, _ = load_config([f"er/cifar100-{split}", f"base/{family}-cifar-8.9m"])
        assert cfg.model == want.model and cfg.model.name == family
        assert (cfg.method, cfg.memory, cfg.train, cfg.data) == (base.method, base.memory, base.train, base.data)
