"""WA: the shared KD losses and weight aligning / clipping against slow transcriptions, the loss of a batch, a
tiny run on digits, the presets and their #P (docs/methods/wa.md)."""
import math

import pytest
import torch

from helpers import SMALL_BACKBONES, fit_on_backbone
from vitcl.cli import main, param_rows
from vitcl.engine.trainer import Trainer
from vitcl.methods.losses import grouped_distillation, soft_distillation
from vitcl.methods.wa import align_factor, clip_weights, weight_align
from vitcl.models.heads import GrowingHead
from vitcl.runconfig import load_config

TINY_RUN = ["data.train_per_class=30", "data.test_per_class=10", "data.increment=[4,3,3]", "model.width=8",
            "train.epochs=5", "train.batch_size=16", "eval.batch_size=64", "memory.size=60", "run.progress=false",
            "run.threads=1"]


def slow_soft_ce(s, t, T):
    """-1/B sum_i sum_c p_ic log q_ic with p = softmax(t/T), q = softmax(s/T), element by element."""
    B, C = s.shape
    total = 0.0
    for i in range(B):
        zt = [math.exp(float(t[i, c]) / T) for c in range(C)]
        zs = [math.exp(float(s[i, c]) / T) for c in range(C)]
        for c in range(C):
            total -= zt[c] / sum(zt) * math.log(zs[c] / sum(zs))
    return total / B


def test_soft_distillation_is_the_softened_cross_entropy():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g) * 3, torch.randn(5, 4, generator=g) * 3
    for T in (1.0, 2.0):
        assert float(soft_distillation(s, t, T)) == pytest.approx(slow_soft_ce(s, t, T), rel=1e-5)
    # not the KL: the teacher's entropy is in it, so it is > 0 even when student == teacher
    assert float(soft_distillation(t, t, 2.0)) > 0.1


def test_grouped_distillation_sums_per_group_softmaxes():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    bounds = [0, 2, 5, 7]
    want = sum(slow_soft_ce(s[:, a:b], t[:, a:b], 2.0) for a, b in zip(bounds[:-1], bounds[1:]))
    assert float(grouped_distillation(s, t, bounds, 2.0)) == pytest.approx(want, rel=1e-5)
    assert float(grouped_distillation(s, t, [0, 7], 2.0)) == pytest.approx(slow_soft_ce(s, t, 2.0), rel=1e-5)


def make_head(sizes, dim=6, seed=0):
    torch.manual_seed(seed)
    head = GrowingHead(dim)
    for n in sizes:
        head.add_task(n)
    return head


def test_weight_align_matches_the_formula():
    head = make_head([3, 2])
    with torch.no_grad():
        head.heads[1].fc.weight.mul_(4.0)  # new classes' rows too long, as after training on imbalanced data
    W = torch.cat([h.fc.weight for h in head.heads]).detach().clone()
    bias = torch.cat([h.fc.bias for h in head.heads]).detach().clone()
    norms = [math.sqrt(sum(float(W[c, j]) ** 2 for j in range(W.shape[1]))) for c in range(5)]
    gamma = (sum(norms[:3]) / 3) / (sum(norms[3:]) / 2)
    assert float(align_factor(W, 3)) == pytest.approx(gamma, rel=1e-6)
    assert weight_align(head) == pytest.approx(gamma, rel=1e-6)
    after = torch.cat([h.fc.weight for h in head.heads]).detach()
    assert torch.equal(after[:3], W[:3])  # old rows untouched
    assert torch.allclose(after[3:], W[3:] * gamma)
    assert torch.equal(torch.cat([h.fc.bias for h in head.heads]).detach(), bias)  # biases untouched
    n = after.norm(dim=1)
    assert float(n[3:].mean()) == pytest.approx(float(n[:3].mean()), rel=1e-6)


def test_clipping_keeps_weights_non_negative_and_biases():
    head = make_head([2, 2])
    W = torch.cat([h.fc.weight for h in head.heads]).detach().clone()
    bias = torch.cat([h.fc.bias for h in head.heads]).detach().clone()
    clip_weights(head)
    after = torch.cat([h.fc.weight for h in head.heads]).detach()
    for c in range(W.shape[0]):
        for j in range(W.shape[1]):
            assert float(after[c, j]) == max(float(W[c, j]), 0.0)
    assert torch.equal(torch.cat([h.fc.bias for h in head.heads]).detach(), bias)


def tiny(tmp_path, *extra, method="wa"):
    cfg, _ = load_config([f"{method}/digits-b0inc2"], [*TINY_RUN, f"run.out_dir={tmp_path}", *extra])
    (tmp_path / "r").mkdir()
    return Trainer(cfg, tmp_path / "r", progress=False)


def test_wa_loss_of_a_batch(tmp_path):
    from vitcl.methods.base import Batch

    tr = tiny(tmp_path, "method.clip=false")
    m = tr.method
    s = tr.scenario
    m.begin_task(s[0])
    m.begin_task(s[1])  # teacher: the 4-class model; student: 7 classes
    torch.manual_seed(0)
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 4, 5, 6, 4])
    batch = Batch(x=x, y=y, task=torch.zeros(6, dtype=torch.long), index=torch.arange(6))
    m.model.eval()
    with torch.no_grad():
        loss, logs = m.loss(batch, m.phases(s[1])[0], s[1])
    z, zt = m.model(x).detach(), m.teacher(x)
    ce = -sum(float(torch.log_softmax(z[i], 0)[y[i]]) for i in range(6)) / 6
    kd = slow_soft_ce(z[:, :4], zt, 2.0)
    lam = 4 / 7
    assert float(loss) == pytest.approx((1 - lam) * ce + lam * kd, rel=1e-5)
    m.opts.kd_weight = 2.0  # PyCIL's CE + 2 KD
    with torch.no_grad():
        loss2, _ = m.loss(batch, m.phases(s[1])[0], s[1])
    assert float(loss2) == pytest.approx(ce + 2 * kd, rel=1e-5)


def test_tiny_wa_run_aligns_clips_and_learns(tmp_path):
    tr = tiny(tmp_path)
    gammas = []
    align = tr.method.consolidate

    def spy(task, ctx):
        align(task, ctx)
        gammas.append(getattr(tr.method, "gamma", None))
    tr.method.consolidate = spy
    res = tr.fit()
    cil = res["class_il"]["seen_acc"]
    assert len(cil) == 3 and cil[0] > 45  # 4 classes: chance is 25
    assert cil[-1] > 20  # 10 classes: chance is 10
    assert gammas[0] is None and all(g is not None and g > 0 for g in gammas[1:])
    W = torch.cat([h.fc.weight for h in tr.method.model.head.heads]).detach()
    assert bool((W >= 0).all())
    n = W.norm(dim=1)
    assert float(n[7:].mean()) == pytest.approx(float(n[:7].mean()), rel=1e-5)  # aligned after the last task


PRESETS = [f"wa/{p}" for p in ("cifar100-b0inc10", "cifar100-b0inc5", "cifar100-b0inc2", "imagenet100-b0inc10",
                               "imagenet1000-b0inc100", "digits-b0inc2")]
PARAMS = {"wa/cifar100-b0inc10": 11.22, "wa/imagenet100-b0inc10": 11.22, "wa/imagenet1000-b0inc100": 11.68}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build(preset):
    cfg, _ = load_config([preset])
    assert cfg.method.name == "wa" and cfg.model.name == "resnet18"
    if preset in PARAMS:
        rows, scenario = param_rows(cfg)
        assert len(rows) == 10
        assert math.floor(rows[-1]["total"] / 1e4 + 1e-9) / 100 == PARAMS[preset]  # the tables' truncated #P


def test_params_cli_prints_the_tables_count(capsys):
    assert main(["params", "wa/cifar100-b0inc10"]) == 0
    assert "11.22" in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.parametrize("backbone", sorted(SMALL_BACKBONES))
def test_other_backbones(tmp_path, backbone):
    res = fit_on_backbone("wa/digits-b0inc2", backbone, tmp_path)
    assert res["tasks_done"] == 2 and len(res["class_il"]["seen_acc"]) == 2


def test_head_without_biases(tmp_path):
    """DER's WA code has a classifier without biases: here they are 0 and never trained."""
    tr = tiny(tmp_path, "method.head_bias=false")
    m, s = tr.method, tr.scenario
    for t in range(2):
        m.begin_task(s[t])
        m.setup_phase(m.phases(s[t])[0], s[t])
    for h in m.model.head.heads:
        assert not h.fc.bias.requires_grad and not bool(h.fc.bias.any())
    assert all(h.fc.weight.requires_grad for h in m.model.head.heads)
