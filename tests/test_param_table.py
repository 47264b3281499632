"""The Mask-RKR paper's parameter table (docs/methods/taskil.md#published-numbers), from the presets, without
pretrained weights (meta device).

Its #P are rounded to two decimals (not truncated: Piggyback/ResNet-18 is 14,707,872 and prints 14.71),
and the percentages are over one backbone with one head."""
import pytest

from vitcl.cli import main, param_rows
from vitcl.runconfig import load_config, preset_names

# preset -> (#P in millions, % over one backbone + one head) after 10 tasks, as printed in the Mask-RKR paper's table
TABLE = {
    "single/cifar100-10tasks": [(111.72, 900.0), (856.59, 900.0), (11.98, 900.0)],
    "multi-head/cifar100-10tasks": [(11.22, 0.41), (85.73, 0.08), (1.22, 1.45)],
    "rkr/cifar100-10tasks": [(11.74, 5.05), (89.88, 4.92), (1.43, 19.72)],
    "piggyback/cifar100-10tasks": [(14.71, 31.65), (112.27, 31.07), (1.56, 30.29)],
    "mask-rkr/cifar100-10tasks": [(11.28, 1.01), (86.26, 0.70), (1.24, 3.79)],
    "single/imagenet-10tasks": [(112.18, 900.0), (858.76, 900.0), (868.46, 900.0)],
    "multi-head/imagenet-10tasks": [(11.68, 4.12), (86.57, 0.81), (87.77, 1.06)],
    "rkr/imagenet-10tasks": [(12.20, 8.73), (90.71, 5.64), (92.34, 6.33)],
    "piggyback/imagenet-10tasks": [(15.17, 35.22), (113.11, 31.71), (113.94, 31.20)],
    "mask-rkr/imagenet-10tasks": [(11.75, 4.71), (87.10, 1.42), (88.35, 1.74)],
}
# "Ours K+": K raised to RKR's size (K = 17 / 19 / 18); the ImageNet rows of the table, except ResNet-18's 12.43
KPLUS = {"mask-rkr/cifar100-10tasks-{}-kplus": [(11.74, 5.05), (89.87, 4.92), (1.43, 19.56)],
         "mask-rkr/imagenet-10tasks-{}-kplus": [None, (90.71, 5.63), (92.30, 6.28)]}
# The two ablation tables of the Mask-RKR slides (docs/methods/taskil.md#ablations), one preset per row: masks on
# RG and/or SFG, and where Piggyback goes in the RG (nowhere, on the product R, on LM and RM)
ABLATION = {
    "rg-real-sfg-real": [(11.74, 5.05), (89.88, 4.92), (1.43, 19.72)],
    "rg-mask-sfg-real": [(11.33, 1.38), (87.07, 1.64), (1.28, 6.59)],
    "rg-real-sfg-mask": [(11.69, 4.68), (89.15, 4.08), (1.40, 17.20)],
    "rg-mask-sfg-mask": [(11.28, 1.01), (86.26, 0.70), (1.24, 3.79)],
    "pb-none": [(11.69, 4.68), (89.15, 4.08), (1.40, 17.20)],
    "pb-product": [(14.41, 29.00), (110.05, 28.48), (1.55, 29.32)],
    "pb-factors": [(11.28, 1.01), (86.26, 0.70), (1.24, 3.79)],
}
CASES = [(f"{p}-{bb}", want) for p, row in TABLE.items() for bb, want in zip(("resnet18", "vit-b16", "swin"), row)]
CASES += [(p.format(bb), want) for p, row in KPLUS.items() for bb, want in zip(("resnet18", "vit-b16", "swin"), row)
          if want]
CASES += [(f"mask-rkr/cifar100-10tasks-{bb}-{row}", want) for row, wants in ABLATION.items()
          for bb, want in zip(("resnet18", "vit-b16", "swin"), wants)]


@pytest.mark.parametrize("preset,want", CASES, ids=[c[0] for c in CASES])
def test_seed_parameter_table(preset, want):
    cfg, _ = load_config([preset])
    rows, scenario = param_rows(cfg)
    assert len(rows) == 10
    last = rows[-1]
    assert round(last["total"] / 1e6, 2) == want[0]
    assert round(last["increase_pct"], 2) == want[1]


RESNET_ROWS = [c[0] for c in CASES if c[0].startswith(("rkr/", "mask-rkr/")) and "resnet18" in c[0]]


@pytest.mark.parametrize("preset", RESNET_ROWS + ["mask-rkr/imagenet-10tasks-resnet18-kplus"])
def test_table_presets_use_the_reference_batchnorm(preset):
    """The reference code's BatchNorm: no scale/shift, one set of running statistics shared by every task; per-task
    statistics stay an override."""
    cfg, _ = load_config([preset])
    assert cfg.method.bn == "shared" and cfg.model.bn_affine is False
    assert load_config([preset], ["method.bn=task"])[0].method.bn == "task"


def test_ablation_presets_set_what_their_row_names():
    """Each ablation row's masks, and the spare scale factors only where the published count holds them."""
    want = {"rg-real-sfg-real": ("real", "real"), "rg-mask-sfg-real": ("mask", "real"),
            "rg-real-sfg-mask": ("real", "mask"), "rg-mask-sfg-mask": ("mask", "mask"), "pb-none": ("real", "mask"),
            "pb-product": ("mask-product", "mask"), "pb-factors": ("mask", "mask")}
    assert set(want) == set(ABLATION)
    for row, (rg, sfg) in want.items():
        for bb in ("resnet18", "vit-b16", "swin"):
            o = load_config([f"mask-rkr/cifar100-10tasks-{bb}-{row}"])[0].method
            assert (o.name, o.rank, o.rg, o.sfg_mode) == ("mask-rkr", 2, rg, sfg)
            assert o.sfg_spare == (row == "rg-mask-sfg-real" and bb != "resnet18")


def test_exact_counts_per_task():
    cfg, _ = load_config(["mask-rkr/cifar100-10tasks-vit-b16"])
    rows, _ = param_rows(cfg)
    # 85,651,200 (ViT-B/16 at 32 px) + base factors 414,720 + heads 7,690 each + masks 414,720 / 32 per later task
    assert rows[0]["total"] == 85_651_200 + 414_720 + 7_690
    assert [r["growth"] for r in rows[1:3]] == [12_960 + 7_690, 2 * (12_960 + 7_690)]
    assert rows[1]["trainable"] == 12_960 + 7_690
    cfg, _ = load_config(["rkr/cifar100-10tasks-resnet18"])
    rows, _ = param_rows(cfg)
    assert rows[1]["growth"] == 51_818 + 5_130 and rows[0]["trainable"] == 51_818 + 5_130
    # the spare F of ViT-B/16 (82,944 = 12 blocks x (4 x 768 + 3,072 + 768)): once in the total, never trained
    plain, _ = param_rows(load_config(["mask-rkr/cifar100-10tasks-vit-b16"], ["method.sfg_mode=real"])[0])
    spare, _ = param_rows(load_config(["mask-rkr/cifar100-10tasks-vit-b16-rg-mask-sfg-real"])[0])
    assert [s["total"] - p["total"] for s, p in zip(spare, plain)] == [82_944] * 10
    assert [s["trainable"] for s in spare] == [p["trainable"] for p in plain]


def test_every_task_il_preset_builds():
    names = [n for n in preset_names() if n.split("/")[0] in ("single", "multi-head", "rkr", "piggyback", "mask-rkr")]
    assert len(names) >= 51
    for name in names:
        if "10tasks" in name:
            continue  # above
        cfg, _ = load_config([name])
        rows, scenario = param_rows(cfg)
        assert len(rows) == len(scenario) and scenario.setting == "task-il"


def test_params_cli_prints_percent_and_rounding(capsys):
    assert main(["params", "piggyback/cifar100-10tasks-resnet18", "--rounding", "round"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "vs 1 backbone+head" in out[1]
    assert out[-1].split()[3] == "14.71" and out[-1].endswith("+31.65%")
    assert main(["params", "piggyback/cifar100-10tasks-resnet18"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[3] == "14.70"  # truncated, as DyTox's tables
