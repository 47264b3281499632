"""UCIR: the cosine classifier, the less-forget constraint, the hard-negative margin ranking and imprinting
against direct transcriptions of their formulas; the adaptive weight, what trains, the ResNet without its last
ReLU, the tables' #P and a tiny run."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from vitcl.cli import main, millions, param_rows
from vitcl.data.build import build_scenario
from vitcl.errors import ConfigError
from vitcl.methods import METHODS, Batch
from vitcl.methods.losses import hard_negative_margin_ranking, less_forget
from vitcl.methods.ucir import CosineClassifier, imprinted_weights
from vitcl.models import MODELS
from vitcl.runconfig import load_config

BASE = ["ucir/digits-b0inc2", "data.class_order=null", "data.increment=[4,3,3]", "data.augment.crop_padding=0",
        "model.width=4"]


_SCENARIOS: dict = {}


def scenario(cfg):
    """Built once per data section (the tests never change a scenario)."""
    key = repr(cfg.data)
    if key not in _SCENARIOS:
        _SCENARIOS[key] = build_scenario(cfg.data)
    return _SCENARIOS[key]


def make(*extra):
    cfg, _ = load_config([BASE[0]], [*BASE[1:], *extra])
    torch.manual_seed(0)
    return METHODS.get("ucir")(cfg, scenario(cfg), torch.device("cpu"))


def batch_of(m, t, n=24):
    idx = m.scenario[t].train_idx[:n]
    x = m.scenario.train.images[idx].float() / 255
    y = m.scenario.train_labels[idx]
    return Batch(x=x, y=y, task=torch.full_like(y, t), index=idx)


def cos(a, b):
    dot = sum(float(u) * float(v) for u, v in zip(a, b))
    return dot / (math.sqrt(sum(float(u) ** 2 for u in a)) * math.sqrt(sum(float(v) ** 2 for v in b)))


def test_less_forget_matches_its_formula():
    torch.manual_seed(0)
    f, g = torch.randn(6, 5), torch.randn(6, 5)
    want = sum(1 - cos(f[i], g[i]) for i in range(6)) / 6
    assert float(less_forget(f, g)) == pytest.approx(want, rel=1e-5)
    assert float(less_forget(f, 3 * f)) == pytest.approx(0.0, abs=1e-6)


def test_margin_ranking_matches_its_formula():
    torch.manual_seed(1)
    c = torch.rand(8, 7) * 2 - 1
    y = torch.tensor([0, 5, 2, 6, 3, 1, 4, 0])
    n_old, k, margin = 4, 2, 0.5
    terms = []
    for i in range(8):
        if int(y[i]) >= n_old:
            continue
        new = sorted((float(c[i, j]) for j in range(n_old, 7)), reverse=True)[:k]
        terms += [max(0.0, margin - float(c[i, y[i]]) + h) for h in new]
    assert float(hard_negative_margin_ranking(c, y, n_old, k, margin)) == pytest.approx(sum(terms) / len(terms))
    assert float(hard_negative_margin_ranking(c, torch.full((8,), 5), n_old, k, margin)) == 0.0


def test_cosine_classifier():
    torch.manual_seed(0)
    head = CosineClassifier(5, sigma=1.0)
    assert float(head.sigma.detach()) == 1.0 and head.sigma.requires_grad
    head.add_task(3)
    old = head.blocks[0].detach().clone()
    head.add_task(2)
    assert torch.equal(head.blocks[0], old) and head.weight.shape == (5, 5)
    assert head.blocks[1].abs().max() <= 1 / math.sqrt(5)
    with torch.no_grad():
        head.sigma.fill_(4.0)
    x = torch.randn(3, 5)
    w = head.weight.detach()
    want = torch.tensor([[4.0 * cos(x[i], w[j]) for j in range(5)] for i in range(3)])
    torch.testing.assert_close(head(x).detach(), want, rtol=1e-5, atol=1e-5)


def test_imprinted_weights_match_their_formula():
    torch.manual_seed(0)
    f = torch.randn(10, 4)
    y = torch.tensor([5, 6, 5, 6, 6, 5, 5, 6, 6, 5])
    old = torch.randn(5, 4)
    scale = sum(math.sqrt(sum(float(v) ** 2 for v in old[i])) for i in range(5)) / 5
    got = imprinted_weights(f, y, range(5, 7), old)
    for r, c in enumerate((5, 6)):
        rows = [f[i] / f[i].norm() for i in range(10) if int(y[i]) == c]
        mean = sum(rows) / len(rows)
        torch.testing.assert_close(got[r], mean / mean.norm() * scale, rtol=1e-5, atol=1e-6)


def test_loss_trainable_parameters_and_adaptive_weight():
    m = make("method.imprint=false")
    m.begin_task(m.scenario[0])
    m.begin_task(m.scenario[1])
    task = m.scenario[1]
    assert m.lam(task) == pytest.approx(5.0 * math.sqrt(4 / 3))
    phase = m.phases(task)[0]
    m.setup_phase(phase, task)
    trainable = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert "head.blocks.0" not in trainable and {"head.blocks.1", "head.sigma"} <= trainable
    assert all(not p.requires_grad for p in m.teacher.parameters()) and not m.teacher.training
    m.model.eval()
    b = batch_of(m, 1)
    b.y[:6] = torch.tensor([0, 1, 2, 3, 0, 1])
    loss, logs = m.loss(b, phase, task)
    f, f_old = m.model.backbone(b.x), m.teacher.backbone(b.x)
    c = F.normalize(f, dim=1) @ F.normalize(m.model.head.weight, dim=1).T
    want = (F.cross_entropy(m.model.head.sigma * c, b.y) + m.lam(task) * less_forget(f, f_old)
            + hard_negative_margin_ranking(c, b.y, 4, 2, 0.5))
    torch.testing.assert_close(loss, want)
    assert set(logs) == {"ce", "lf", "mr"}
    # the first task: cross-entropy alone
    m0 = make()
    m0.begin_task(m0.scenario[0])
    loss0, logs0 = m0.loss(batch_of(m0, 0), m0.phases(m0.scenario[0])[0], m0.scenario[0])
    assert set(logs0) == {"ce"}


def test_class_balanced_finetuning_phase():
    m = make("method.cbf_epochs=4")
    m.begin_task(m.scenario[0])
    assert [p.name for p in m.phases(m.scenario[0])] == ["train"]
    m.begin_task(m.scenario[1])
    phases = m.phases(m.scenario[1])
    assert [p.name for p in phases] == ["train", "cbf"] and phases[1].data == "memory" and phases[1].lr == 0.01
    m.setup_phase(phases[1], m.scenario[1])
    assert {n for n, p in m.model.named_parameters() if p.requires_grad} == {"head.blocks.0", "head.blocks.1",
                                                                              "head.sigma"}


def test_embed_is_normalised():
    m = make()
    m.begin_task(m.scenario[0])
    with torch.no_grad():
        e = m.embed(batch_of(m, 0).x)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(len(e)))


def test_resnet_without_the_last_relu():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    cfg, _ = load_config(["ucir/digits-b0inc2"], ["model.width=4"])
    assert cfg.model.last_relu is False
    cls = MODELS.get("resnet18")
    for last_relu in (True, False):
        torch.manual_seed(0)
        net = cls([2, 2, 2, 2], [4, 8, 16, 32], 3, "cifar", last_relu=last_relu).eval()
        blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
        assert [b.out_relu for b in blocks] == [True] * 7 + [last_relu]
        out = net.forward_features(x)
        assert (out.min() < 0) == (not last_relu)
    with pytest.raises(ConfigError):
        load_config(["ucir/digits-b0inc2"], ["model.last_relu=maybe"])


@pytest.mark.parametrize("preset,want", [("ucir/cifar100-b0inc10", 11_168_832 + 51_201),
                                         ("ucir/cifar100-b0inc2", 11_168_832 + 51_201),
                                         ("ucir/imagenet100-b0inc10", 11_176_512 + 51_201)])
def test_the_tables_parameter_counts(preset, want):
    cfg, _ = load_config([preset])
    rows, _ = param_rows(cfg)
    assert rows[-1]["total"] == want and millions(want) == "11.22"


def test_every_ucir_preset_builds():
    for name in ("cifar100-b0inc10", "cifar100-b0inc5", "cifar100-b0inc2", "imagenet100-b0inc10"):
        cfg, _ = load_config([f"ucir/{name}"])
        assert cfg.model.last_relu is False and cfg.memory.per_class == 20
        assert cfg.method.lambda_base == (10.0 if "imagenet" in name else 5.0)


def test_bad_options_are_config_errors():
    for bad in ("method.k=0", "method.margin=-1", "method.sigma_init=0", "data.augment.cutmix_alpha=1.0"):
        with pytest.raises(ConfigError):
            load_config([BASE[0]], [bad])


def test_tiny_run_through_the_cli(tmp_path):
    rc = main(["run", *BASE, "data.train_per_class=60", "data.test_per_class=10",
               "train.epochs=3", "train.batch_size=32", "train.checkpoint_every=100", "run.threads=1", "method.cbf_epochs=1",
               f"run.out_dir={tmp_path}", "run.name=r", "-q"])
    assert rc == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    acc = res["class_il"]["acc_matrix"]
    assert len(acc) == 3 and acc[0][0] > 50 and res["class_il"]["last"] > 30  # chance: 10
    nme = res["extra"]["nme"]["class_il"]  # the NME row, from the same evaluation pass
    assert len(nme["acc_matrix"]) == 3 and nme["last"] > 30
