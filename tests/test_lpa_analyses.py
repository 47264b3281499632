"""LPA's two analyses as presets (docs/methods/lpa.md#analyses): the lambda initialisation and the number of LPSA
layers, replaced one by one from the shallowest. Each preset is the B50-10 "w/LPA" preset with one model option
changed, and builds the network it names (tiny widths: the attention kinds and the lambda draw do not depend on
them)."""
import pytest
import torch

from vitcl.models.convit import GPSA, ConViT
from vitcl.models.lpsa import LPSA
from vitcl.runconfig import load_config, preset_names

BASE = "lpa/cifar100-b50inc10"
LAMBDAS = ["0", "0.001", "0.005", "0.01", "0.02", "0.05", "0.1", "0.5", "1.0"]
TINY = {"embed_dim": 48, "patch_size": 8}  # 12 heads kept: LPSA's 3 x 3 local kernel needs 9 of them


def without(cfg, *model_keys):
    """The config without the given model keys and without the published cell (each preset names its own)."""
    d = cfg.to_dict()
    d.pop("published")
    for k in model_keys:
        d["model"].pop(k)
    return d


def test_the_grid_is_complete():
    names = [n for n in preset_names() if n.startswith(f"{BASE}-")]
    assert sorted(names) == sorted([f"{BASE}-lambda-{v}" for v in LAMBDAS]
                                   + [f"{BASE}-lpsa-layers-{k}" for k in range(6)])


@pytest.mark.parametrize("value", LAMBDAS)
def test_lambda_presets_change_only_the_lambda_draw(value):
    cfg, _ = load_config([f"{BASE}-lambda-{value}"])
    base, _ = load_config([BASE])
    assert cfg.model.lpsa_lambda_std == float(value) and cfg.model.sab == "lpsa" and not cfg.model.sab_layers
    assert without(cfg, "lpsa_lambda_std") == without(base, "lpsa_lambda_std")
    assert (cfg.data.initial_increment, cfg.data.increment, cfg.method.name) == (50, 10, "lpa-baseline")
    torch.manual_seed(0)
    net = ConViT(32, 3, cfg.model, **TINY)
    attns = [b.attn for b in net.encoder.blocks]
    assert len(attns) == 5 and all(isinstance(a, LPSA) and a.lambda_std == float(value) for a in attns)
    lam = torch.cat([a.lambdas.detach() for a in attns])  # 60 draws
    if value == "0":
        assert torch.equal(lam, torch.zeros(60))
    else:
        assert lam.abs().max() <= 2.0 and 0.6 * float(value) < lam.std() < 1.4 * float(value)


@pytest.mark.parametrize("k", range(6))
def test_layer_presets_put_lpsa_in_the_k_shallowest_sabs(k):
    cfg, _ = load_config([f"{BASE}-lpsa-layers-{k}"])
    base, _ = load_config([BASE])
    assert cfg.model.sab_layers == ["lpsa"] * k + ["gpsa"] * (5 - k)
    assert without(cfg, "sab_layers", "sab") == without(base, "sab_layers", "sab")
    assert cfg.model.lpsa_lambda_std == 0.02
    torch.manual_seed(0)
    net = ConViT(32, 3, cfg.model, **TINY)
    assert [type(b.attn) for b in net.encoder.blocks] == [LPSA] * k + [GPSA] * (5 - k)


def test_the_ends_of_the_layer_grid_are_the_table_presets():
    """k = 0 is the baseline's network, k = 5 the w/LPA one, under the same method and recipe."""
    for k, other in ((0, "lpa-baseline/cifar100-b50inc10"), (5, BASE)):
        cfg, _ = load_config([f"{BASE}-lpsa-layers-{k}"])
        ref, _ = load_config([other])
        assert without(cfg, "sab_layers") == without(ref, "sab_layers")
        torch.manual_seed(0)
        a = ConViT(32, 3, cfg.model, **TINY)
        torch.manual_seed(0)
        b = ConViT(32, 3, ref.model, **TINY)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)
