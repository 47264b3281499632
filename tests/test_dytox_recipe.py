"""The published DyTox and LPA recipe values in the reproduction presets, the overlay that fixes them, and the
options they set (docs/methods/dytox.md and lpa.md, "Public code versus paper")."""
import pytest
import torch

from vitcl.config import OptimConfig
from vitcl.data.stream import global_batches
from vitcl.engine.optim import lr_at
from vitcl.runconfig import load_config, preset_names

DYTOX = [n for n in preset_names() if n.split("/")[0] in ("dytox", "dytox-plus") and "digits" not in n]
LPA = [n for n in preset_names() if n.split("/")[0] in ("lpa", "lpa-baseline", "dytox-plus-lpa") and "digits" not in n]
DIGITS = ["dytox/digits-b0inc2", "lpa/digits-b0inc2", "lpa-baseline/digits-b0inc2"]


def test_preset_lists_are_not_empty_and_overlays_are_not_presets():
    # DyTox: 14 reproduction presets + 5 model-ablation rows; LPA: 21 table presets + 15 of its two analyses
    assert len(DYTOX) == 19 and len(LPA) == 36
    assert not any(n.startswith("overlays/") for n in preset_names())


@pytest.mark.parametrize("name", DYTOX)
def test_dytox_presets_carry_the_published_recipe(name):
    cfg, _ = load_config([name])
    assert cfg.memory.selection == "dytox-herding" and cfg.memory.features_augment
    assert cfg.method.finetune_order == "stored_drop_last" and not cfg.method.finetune_drop_last
    assert cfg.train.lr_step == "timm-after-epoch" and cfg.train.drop_last


@pytest.mark.parametrize("name", LPA)
def test_lpa_presets_carry_the_published_recipe(name):
    cfg, _ = load_config([name])
    assert cfg.memory.selection == "dytox-herding" and not cfg.memory.features_augment
    assert cfg.method.finetune_order == "shuffled" and cfg.method.finetune_drop_last
    assert cfg.train.lr_step == "timm-after-epoch" and cfg.train.drop_last


@pytest.mark.parametrize("name", DYTOX + LPA)
def test_the_overlay_turns_every_fix_on(name):
    cfg, _ = load_config([name, "overlays/dytox-fixes"])
    base, _ = load_config([name])
    assert cfg.method.name == base.method.name and cfg.model == base.model
    assert cfg.memory.selection == "herding" and not cfg.memory.features_augment
    assert cfg.method.finetune_order == "shuffled" and not cfg.method.finetune_drop_last
    assert cfg.train.lr_step == "epoch-start" and not cfg.train.drop_last


@pytest.mark.parametrize("name", DIGITS)
def test_the_digits_demos_keep_todays_behaviour(name):
    cfg, _ = load_config([name])
    assert cfg.memory.selection == "herding" and not cfg.memory.features_augment
    assert cfg.method.finetune_order == "shuffled" and not cfg.method.finetune_drop_last
    assert cfg.train.lr_step == "epoch-start" and not cfg.train.drop_last


def test_timm_after_epoch_runs_one_epoch_behind_warmup_included():
    base = OptimConfig(lr=1e-3, warmup_epochs=3, warmup_lr=1e-6, min_lr=1e-5, schedule="cosine")
    lag = OptimConfig(**{**base.__dict__, "lr_step": "timm-after-epoch"})
    epochs = 10
    assert lr_at(lag, epochs, 0) == lr_at(base, epochs, 0) == pytest.approx(1e-6)
    for e in range(1, epochs):
        assert lr_at(lag, epochs, e) == lr_at(base, epochs, e - 1)


def test_phases_follow_the_drop_last_options():
    cfg, _ = load_config(["dytox/cifar100-b0inc10"])
    from vitcl.methods.base import Phase
    assert Phase.from_train("train", "task+memory", cfg.train, 1).drop_last
    cfg2, _ = load_config(["dytox/cifar100-b0inc10", "overlays/dytox-fixes"])
    assert not Phase.from_train("train", "task+memory", cfg2.train, 1).drop_last
    assert [len(b) for b in global_batches(torch.arange(10), 4, True)] == [4, 4]
