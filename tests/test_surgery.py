"""Parameter surgery (Piggyback, RKR, Mask-RKR) against direct, slow transcriptions of docs/methods/taskil.md."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitcl.errors import ConfigError
from vitcl.models.surgery import (
    LayerRule,
    TaskBatchNorm,
    TaskLayer,
    TaskParams,
    add_task,
    apply_surgery,
    binarize,
    count_parameters,
    default_rules,
    set_task,
    slot_parameters,
)

THR = 5e-3


def test_binarize_threshold_and_straight_through_gradient():
    s = torch.tensor([-1.0, 0.0, 5e-3, 5.0001e-3, 1e-2], requires_grad=True)
    b = binarize(s, THR)
    assert b.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # 1[s > 5e-3]: the code's le -> 0, gt -> 1
    (b * torch.arange(5.0)).sum().backward()
    assert s.grad.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def slow_conv_rectification(lm: torch.Tensor, rm: torch.Tensor, k: int, c_in: int, c_out: int) -> torch.Tensor:
    """docs/methods/taskil.md#rkr element by element: R = LM·RM of shape (k·c_in, k·c_out), read in row-major
    order as (k, k, c_in, c_out), then permuted to (c_out, c_in, k, k)."""
    prod = lm @ rm
    flat = [prod[r, c].item() for r in range(prod.shape[0]) for c in range(prod.shape[1])]
    out = torch.zeros(c_out, c_in, k, k)
    for a in range(k):
        for b in range(k):
            for i in range(c_in):
                for o in range(c_out):
                    out[o, i, a, b] = flat[((a * k + b) * c_in + i) * c_out + o]
    return out


def scores_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(t.shape, generator=gen) < 0.3, torch.tensor(-0.01), torch.tensor(0.02))


@torch.no_grad()
def test_rkr_conv_matches_transcription():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    layer = TaskLayer(conv, TaskParams(rank=2, sfg=True))
    layer.add_task()
    slot = layer.slots[0]
    slot["f"].copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
    x = torch.randn(2, 3, 7, 7)
    lm, rm = slot["lm"][0], slot["rm"][0]
    assert lm.shape == (3 * 3, 2) and rm.shape == (2, 3 * 4)
    w = conv.weight + slow_conv_rectification(lm, rm, 3, 3, 4)
    want = F.conv2d(x, w, None, 2, 1) * slot["f"].view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), want)


@torch.no_grad()
@pytest.mark.parametrize("groups", [2, 4])  # 4: depthwise, as CvT's convolutional projections
def test_rkr_grouped_conv_rectifies_each_groups_kernels(groups):
    """A grouped conv's weight is (c_out, c_in / groups, k, k): the rectification has that shape, with c_in the
    channels of one group."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=groups, bias=True)
    layer = TaskLayer(conv, TaskParams(rank=2, sfg=True))
    layer.add_task()
    slot = layer.slots[0]
    per_group = 4 // groups
    lm, rm = slot["lm"][0], slot["rm"][0]
    assert lm.shape == (3 * per_group, 2) and rm.shape == (2, 3 * 4)
    x = torch.randn(2, 4, 5, 5)
    w = conv.weight + slow_conv_rectification(lm, rm, 3, per_group, 4)
    want = F.conv2d(x, w, conv.bias, 1, 1, 1, groups) * slot["f"].view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), want)


@torch.no_grad()
def test_rkr_fused_qkv_equals_three_separate_linears():
    torch.manual_seed(0)
    d = 6
    qkv = nn.Linear(d, 3 * d)
    layer = TaskLayer(qkv, TaskParams(rank=2, sfg=True), split=3)
    layer.add_task()
    slot = layer.slots[0]
    slot["f"].uniform_(0.5, 1.5)
    x = torch.randn(5, d)
    outs = []
    for i in range(3):  # q, k, v as in the code: W_i + (LM_i·RM_i)^T, then the SFG on that output
        w_i, b_i = qkv.weight[i * d:(i + 1) * d], qkv.bias[i * d:(i + 1) * d]
        r_i = (slot["lm"][i] @ slot["rm"][i]).T
        outs.append(F.linear(x, w_i + r_i, b_i) * slot["f"][i * d:(i + 1) * d])
    torch.testing.assert_close(layer(x), torch.cat(outs, dim=1))
    # per task: 3 * (d + d) * K for RG and 3d for SFG, not (d + 3d) * K
    assert sum(p.numel() for p in slot.values()) == 3 * (d + d) * 2 + 3 * d


def test_factor_init_is_kaiming_uniform_times_scale():
    torch.manual_seed(0)
    layer = TaskLayer(nn.Linear(400, 300), TaskParams(rank=2, scale=0.1))
    layer.add_task()
    lm, rm = layer.slots[0]["lm"][0], layer.slots[0]["rm"][0]
    # torch's kaiming_uniform_ on (in, K): bound sqrt(6 / K); on (K, out): sqrt(6 / out); times 0.1
    assert lm.abs().max() <= 0.1 * (6 / 2) ** 0.5 and lm.abs().max() > 0.09 * (6 / 2) ** 0.5
    assert rm.abs().max() <= 0.1 * (6 / 300) ** 0.5


@torch.no_grad()
def test_piggyback_mask_on_weights():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    for base, x in ((nn.Linear(5, 4), torch.randn(3, 5)), (nn.Conv2d(2, 3, 3, padding=1), torch.randn(2, 2, 5, 5))):
        layer = TaskLayer(base, TaskParams(weight_mask=True))
        layer.add_task()
        layer.add_task()
        assert torch.equal(layer.slots[0]["w_score"], torch.full_like(base.weight, 1e-2))  # starts all ones
        torch.testing.assert_close(layer(x), base(x))
        layer.slots[1]["w_score"].copy_(scores_like(base.weight, gen))
        layer.task = 1
        mask = (layer.slots[1]["w_score"] > THR).float()
        op = F.linear if isinstance(base, nn.Linear) else (lambda a, w, b: F.conv2d(a, w, b, padding=1))
        torch.testing.assert_close(layer(x), op(x, mask * base.weight, base.bias))


@torch.no_grad()
def test_mask_rkr_later_tasks_mask_the_base_factors():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    layer = TaskLayer(conv, TaskParams(rank=2, sfg=True, later="mask", sfg_later="mask"))
    layer.add_task()
    layer.add_task()
    base, s1 = layer.slots[0], layer.slots[1]
    assert set(base) == {"lm", "rm", "f"} and set(s1) == {"lm_score", "rm_score", "f_score"}
    base["f"].uniform_(0.5, 2.0)
    x = torch.randn(2, 2, 6, 6)
    layer.task = 0
    y0 = layer(x)
    layer.task = 1
    torch.testing.assert_close(layer(x), y0)  # masks start all ones: task 1 starts as task 0
    for name in s1:
        s1[name].copy_(scores_like(s1[name], gen))
    lm = (s1["lm_score"][0] > THR).float() * base["lm"][0]
    rm = (s1["rm_score"][0] > THR).float() * base["rm"][0]
    f = (s1["f_score"] > THR).float() * base["f"]
    w = conv.weight + slow_conv_rectification(lm, rm, 3, 2, 3)
    torch.testing.assert_close(layer(x), F.conv2d(x, w, None, 1, 1) * f.view(1, -1, 1, 1))


@torch.no_grad()
def test_mask_rkr_variants():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(4, 6)
    x = torch.randn(3, 4)
    # PBwR: one mask over the product
    layer = TaskLayer(lin, TaskParams(rank=2, sfg=False, later="mask-product"))
    layer.add_task()
    layer.add_task()
    assert set(layer.slots[1]) == {"r_score"} and layer.slots[1]["r_score"].shape == lin.weight.shape
    layer.slots[1]["r_score"].copy_(scores_like(lin.weight, gen))
    layer.task = 1
    r = (layer.slots[0]["lm"][0] @ layer.slots[0]["rm"][0]).T
    want = F.linear(x, lin.weight + (layer.slots[1]["r_score"] > THR).float() * r, lin.bias)
    torch.testing.assert_close(layer(x), want)
    # LM real per task, RM masked (the code's LMnoPB); and real factors (RGnoPB) with a real F (SFGnoPB)
    layer = TaskLayer(lin, TaskParams(rank=2, sfg=True, later="mask-rm", sfg_later="real"))
    layer.add_task()
    layer.add_task()
    assert set(layer.slots[1]) == {"lm", "rm_score", "f"}
    layer = TaskLayer(lin, TaskParams(rank=2, sfg=True, later="real", sfg_later="real"))
    layer.add_task()
    layer.add_task()
    assert set(layer.slots[1]) == {"lm", "rm", "f"}
    assert not torch.equal(layer.slots[1]["lm"], layer.slots[0]["lm"])  # fresh factors per task


def test_only_the_current_slot_learns():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 2, 1, bias=False))
    apply_surgery(net, [LayerRule("*")], TaskParams(rank=2, sfg=True, later="mask", sfg_later="mask"))
    add_task(net)
    add_task(net)
    for p in net.parameters():
        p.requires_grad_(False)
    for p in slot_parameters(net, 1):
        p.requires_grad_(True)
    set_task(net, 1)
    net(torch.randn(2, 1, 5, 5)).sum().backward()
    grads = {n: p.grad is not None for n, p in net.named_parameters()}
    assert all(v == (".slots.1." in n) for n, v in grads.items()), grads
    assert all(n.endswith("_score") for n, v in grads.items() if v)


def test_batchnorm_modes():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    per_task = TaskBatchNorm(bn, "task")
    per_task.add_task()
    per_task.add_task()
    per_task.train()
    per_task.task = 1
    per_task(x)
    assert torch.equal(per_task.stats[0].running_mean, bn.running_mean)  # task 0 untouched
    assert not torch.equal(per_task.stats[1].running_mean, bn.running_mean)
    frozen = TaskBatchNorm(bn, "frozen")
    frozen.train()
    y = frozen(x)
    assert torch.equal(frozen.running_mean, bn.running_mean)  # never updated, even in train mode
    torch.testing.assert_close(y, bn.eval()(x))
    shared = TaskBatchNorm(bn, "shared")
    shared.train()
    shared(x)
    assert not torch.equal(shared.running_mean, bn.running_mean)


def test_spare_scale_factors_change_the_count_only():
    """sfg_spare (the public ViT/Swin code's unused shared F under SFGnoPB): one more F per SFG layer in the count,
    the same outputs for every task as without it, never trained."""
    torch.manual_seed(0)
    make = [nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1, bias=False)]
    nets = []
    for spare in (False, True):
        net = nn.Sequential(*[copy.deepcopy(m) for m in make])
        apply_surgery(net, [LayerRule("0"), LayerRule("3", sfg=False)],
                      TaskParams(rank=2, sfg=True, later="mask", sfg_later="real", sfg_spare=spare))
        add_task(net)
        add_task(net)
        nets.append(net)
    plain, spare = nets
    gen = torch.Generator().manual_seed(1)
    for (n, p), (m, q) in zip(plain.named_parameters(), [(m, q) for m, q in spare.named_parameters()
                                                          if not m.endswith("f_spare")]):
        assert n == m
        with torch.no_grad():
            p.copy_(scores_like(p, gen) if n.endswith("_score") else torch.randn(p.shape, generator=gen))
            q.copy_(p)
    assert count_parameters(spare) - count_parameters(plain) == 4  # the first conv's 4 channels; the 1x1 has no SFG
    spares = [(n, p) for n, p in spare.named_parameters() if n.endswith("f_spare")]
    assert [n for n, _ in spares] == ["0.f_spare"] and not spares[0][1].requires_grad
    assert all(p is not spares[0][1] for t in (0, 1) for p in slot_parameters(spare, t))
    x = torch.randn(2, 2, 5, 5)
    for t in (0, 1):
        set_task(plain, t)
        set_task(spare, t)
        plain.eval()
        spare.eval()
        torch.testing.assert_close(spare(x), plain(x))
    with pytest.raises(ConfigError, match="spare"):
        TaskParams(rank=2, sfg=True, sfg_later="mask", sfg_spare=True)


def test_masks_cost_one_32nd():
    net = nn.Sequential(nn.Linear(8, 4, bias=False))
    apply_surgery(net, [LayerRule("*")], TaskParams(weight_mask=True))
    add_task(net)
    add_task(net)
    assert count_parameters(net) == 32 + 2 * 32 / 32


def test_unmatched_pattern_is_a_config_error():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="blocks"):
        apply_surgery(net, [LayerRule("blocks.*.attn.qkv")], TaskParams(rank=2))
    with pytest.raises(ConfigError, match="split"):
        apply_surgery(nn.Sequential(nn.Linear(4, 4)), [LayerRule("*", split=3)], TaskParams(rank=2))


def per_task_cost(model_cfg: dict, rules, img: int = 224, rank: int = 2) -> tuple[int, int]:
    """(RG, SFG) parameters one task adds, counted on the meta device."""
    from vitcl.config import build
    from vitcl.models import MODELS, create_backbone

    opts = build(MODELS.get(model_cfg["name"]).Options, model_cfg)
    with torch.device("meta"):
        net = create_backbone(opts, img, 3)
        apply_surgery(net, rules, TaskParams(rank=rank, sfg=True))
        add_task(net)
    slots = [m.slots[0] for m in net.modules() if isinstance(m, TaskLayer)]
    rg = sum(s[k].numel() for s in slots for k in ("lm", "rm"))
    sfg = sum(s["f"].numel() for s in slots if "f" in s)
    return rg, sfg


def test_per_task_costs_of_rkr_at_rank_2():
    assert per_task_cost({"name": "resnet18", "stem": "imagenet", "bn_affine": False},
                         default_rules("resnet18")) == (47_018, 4_800)
    vit_b = {"name": "vit", "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}
    assert per_task_cost(vit_b, default_rules("vit")) == (331_776, 82_944)
    # Swin: the public code's layers (no SFG after qkv); the Mask-RKR table's counts need exactly this
    swin_cifar = {"name": "swin", "embed_dim": 96, "depths": [2, 2], "num_heads": [3, 6]}
    assert sum(per_task_cost(swin_cifar, default_rules("swin"))) == 21_888
    swin_b = {"name": "swin", "embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]}
    assert sum(per_task_cost(swin_b, default_rules("swin"))) == 457_216


@torch.no_grad()
def test_finished_masks_are_stored_as_bool_and_reload():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 5))
    apply_surgery(net, [LayerRule("*")], TaskParams(weight_mask=True, rank=2, sfg=True, later="mask",
                                                    sfg_later="mask"))
    add_task(net)
    add_task(net)
    for p in net[0].slots[1].values():
        p.copy_(scores_like(p, gen))
    x = torch.randn(3, 6)
    set_task(net, 1)
    before = net(x)
    cost = count_parameters(net)
    from vitcl.models.surgery import freeze_task

    freeze_task(net, 1)
    assert all(p.dtype == torch.bool for n, p in net[0].slots[1].items())
    torch.testing.assert_close(net(x), before)
    assert count_parameters(net) == cost
    fresh = nn.Sequential(nn.Linear(6, 5))
    apply_surgery(fresh, [LayerRule("*")], TaskParams(weight_mask=True, rank=2, sfg=True, later="mask",
                                                      sfg_later="mask"))
    add_task(fresh)
    add_task(fresh)
    fresh.load_state_dict(net.state_dict())
    set_task(fresh, 1)
    assert fresh[0].slots[1]["w_score"].dtype == torch.bool
    torch.testing.assert_close(fresh(x), before)
