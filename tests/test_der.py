"""DER without pruning: weight aligning and the auxiliary targets against their formulas, the growth (old
extractors frozen, BatchNorm in eval), the losses, the classifier stage, the tables' #P and a tiny run."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from vitcl.cli import main, millions, param_rows
from vitcl.data.build import build_scenario
from vitcl.methods import METHODS, Batch
from vitcl.methods.der import align_weights, auxiliary_targets
from vitcl.runconfig import load_config

TINY_RESNET = ["model.width=4"]
TINY_VIT = ["model.name=vit", "model.patch_size=4", "model.embed_dim=16", "model.depth=1", "model.num_heads=2"]
TINY_CONVIT = ["model.name=convit", "model.patch_size=4", "model.embed_dim=16", "model.num_heads=2", "model.depth=2",
               "model.local_up_to_layer=1"]
BASE = ["der/digits-b0inc2", "data.class_order=null", "data.increment=[4,3,3]", "data.augment.crop_padding=0"]


_SCENARIOS: dict = {}


def scenario(cfg):
    """Built once per data section (the tests never change a scenario)."""
    key = repr(cfg.data)
    if key not in _SCENARIOS:
        _SCENARIOS[key] = build_scenario(cfg.data)
    return _SCENARIOS[key]


def make(*extra, model=TINY_RESNET):
    cfg, _ = load_config([BASE[0]], [*BASE[1:], *model, *extra])
    torch.manual_seed(0)
    return METHODS.get("der")(cfg, scenario(cfg), torch.device("cpu"))


def batch_of(m, t, n=24):
    idx = m.scenario[t].train_idx[:n]
    x = m.scenario.train.images[idx].float() / 255
    y = m.scenario.train_labels[idx]
    return Batch(x=x, y=y, task=torch.full_like(y, t), index=idx)


def step(m, t, phase_i=0, steps=2, lr=0.1):
    task = m.scenario[t]
    phase = m.phases(task)[phase_i]
    m.setup_phase(phase, task)
    opt = torch.optim.SGD([p for p in m.model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss, logs = m.loss(batch_of(m, t), phase, task)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return logs


def test_weight_aligning_matches_its_formula():
    torch.manual_seed(0)
    w = torch.randn(7, 5) * torch.linspace(0.5, 3, 7)[:, None]
    n_new = 3
    old = [math.sqrt(sum(float(v) ** 2 for v in w[i])) for i in range(4)]
    new = [math.sqrt(sum(float(v) ** 2 for v in w[i])) for i in range(4, 7)]
    gamma = (sum(old) / 4) / (sum(new) / 3)
    want = w.clone()
    for i in range(4, 7):
        for j in range(5):
            want[i, j] = w[i, j] * gamma
    torch.testing.assert_close(align_weights(w, n_new), want)
    aligned = align_weights(w, n_new)
    assert aligned[4:].norm(dim=1).mean() == pytest.approx(float(w[:4].norm(dim=1).mean()), rel=1e-5)


def test_auxiliary_targets():
    y = torch.tensor([0, 3, 4, 5, 9, 2])
    want = [0 if int(v) < 4 else int(v) - 4 + 1 for v in y]
    assert auxiliary_targets(y, 4).tolist() == want


def test_growth_freezes_old_extractors_and_their_batchnorm():
    m = make()
    m.begin_task(m.scenario[0])
    step(m, 0)
    assert m.model.aux is None and m.model.fc.weight.shape == (4, 32)
    m.begin_task(m.scenario[1])
    e0, e1 = m.model.extractors
    # the new extractor starts from the previous one's weights
    torch.testing.assert_close(e1.conv1.weight, e0.conv1.weight)
    assert m.model.fc.weight.shape == (7, 64) and m.model.fc.bias is None
    assert m.model.aux.weight.shape == (3 + 1, 32)
    x = batch_of(m, 0).x
    e0.eval()
    with torch.no_grad():
        before = e0(x)
    step(m, 1)
    assert not e0.training and e1.training
    assert all(not p.requires_grad for p in e0.parameters())
    with torch.no_grad():
        torch.testing.assert_close(e0(x), before, rtol=0, atol=0)  # weights and running statistics unchanged


def test_loss_is_ce_plus_weighted_auxiliary_ce():
    m = make("method.aux_weight=0.7")
    for t in (0, 1):
        m.begin_task(m.scenario[t])
    task = m.scenario[1]
    phase = m.phases(task)[0]
    m.setup_phase(phase, task)
    m.model.eval()  # same BatchNorm statistics for both computations
    b = batch_of(m, 1)
    b.y[:5] = torch.tensor([0, 1, 2, 3, 0])  # some old-class labels
    loss, logs = m.loss(b, phase, task)
    feats = torch.cat([e(b.x) for e in m.model.extractors], 1)
    ce = F.cross_entropy(feats @ m.model.fc.weight.T, b.y)
    aux_y = torch.tensor([0 if v < 4 else v - 3 for v in b.y.tolist()])
    aux = F.cross_entropy(feats[:, 32:] @ m.model.aux.weight.T, aux_y)
    torch.testing.assert_close(loss, ce + 0.7 * aux)
    torch.testing.assert_close(logs["aux"], aux)


def test_retraining_resets_and_trains_the_classifier_alone():
    m = make("method.retrain_temperature=5.0")
    for t in (0, 1):
        m.begin_task(m.scenario[t])
        step(m, t)
    task = m.scenario[1]
    phases = m.phases(task)
    assert [p.name for p in phases] == ["train", "retrain"] and phases[1].data == "memory"
    assert phases[1].optimizer == "sgd" and phases[1].milestones == [3] and phases[1].lr == 0.1
    trained = m.model.fc.weight.detach().clone()
    m.setup_phase(phases[1], task)
    fc = m.model.fc
    assert not torch.equal(fc.weight, trained)  # re-initialised
    assert [n for n, p in m.model.named_parameters() if p.requires_grad] == ["fc.weight"]
    assert not m.model.training
    m.setup_phase(phases[1], task)  # a resumed phase keeps what it trained
    assert m.model.fc is fc
    b = batch_of(m, 1)
    loss, _ = m.loss(b, phases[1], task)
    torch.testing.assert_close(loss, F.cross_entropy(m.model(b.x) / 5.0, b.y))
    assert make().phases(m.scenario[0])[-1].name == "train"  # no classifier stage after the first task


def test_weight_align_stage():
    m = make("method.classifier_stage=weight_align")
    for t in (0, 1):
        m.begin_task(m.scenario[t])
        step(m, t)
    assert [p.name for p in m.phases(m.scenario[1])] == ["train"]
    w = m.model.fc.weight.detach().clone()
    m.consolidate(m.scenario[1], None)
    torch.testing.assert_close(m.model.fc.weight, align_weights(w, 3))


def test_copy_old_classifier_init():
    m = make("method.classifier_init=copy_old", "method.bias=true")
    m.begin_task(m.scenario[0])
    step(m, 0)
    w, b = m.model.fc.weight.detach().clone(), m.model.fc.bias.detach().clone()
    m.begin_task(m.scenario[1])
    torch.testing.assert_close(m.model.fc.weight[:4, :32], w)
    torch.testing.assert_close(m.model.fc.bias[:4], b)


@pytest.mark.parametrize("model", [TINY_VIT, TINY_CONVIT], ids=["vit", "convit"])
def test_der_on_transformers(model):
    """One backbone per task: the old transformer frozen, its output unchanged by the next task's steps."""
    m = make(model=model)
    m.begin_task(m.scenario[0])
    step(m, 0)
    x = batch_of(m, 0).x
    m.model.eval()
    with torch.no_grad():
        before = m.model.extractors[0](x)
    m.begin_task(m.scenario[1])
    logs = step(m, 1)
    m.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(m.model.extractors[0](x), before, rtol=0, atol=0)
    assert len(m.model.extractors) == 2 and m.model.fc.weight.shape == (7, 32)
    assert torch.isfinite(logs["aux"])
    with torch.no_grad():
        assert m.logits(batch_of(m, 0).x).shape == (24, 7)


# ResNet-18 (ImageNet stem) = 11,176,512; classifier 512N x C, no bias (the authors' classifiers)
IMAGENET_STEM = 11_176_512
CIFAR_STEM = 11_168_832


@pytest.mark.parametrize("preset,extra,n,classes,want", [
    ("der/cifar100-b0inc10", ["model.stem=imagenet"], 10, 100, ("112.27", "truncate")),
    ("der/cifar100-b0inc5", ["model.stem=imagenet"], 20, 100, ("224.55", "truncate")),
    ("der/cifar100-b0inc2", ["model.stem=imagenet"], 50, 100, ("561.39", "round")),
    ("der/imagenet100-b0inc10", [], 10, 100, ("112.27", "truncate")),
    ("der/imagenet1000-b0inc100", [], 10, 1000, ("116.89", "round")),
    ("der/cifar100-b0inc10", [], 10, 100, ("112.20", "truncate")),
])
def test_the_tables_parameter_counts(preset, extra, n, classes, want):
    """docs/methods/der.md#parameters: the tables' DER w/o P #P are the ImageNet-stem counts (their last digit
    truncated for 10 and 20 steps, rounded for 50 steps and ImageNet-1000); the CIFAR presets' own stem, the
    authors', counts 7,680 fewer per extractor."""
    cfg, _ = load_config([preset], extra)
    rows, _ = param_rows(cfg)
    stem = IMAGENET_STEM if cfg.model.stem == "imagenet" else CIFAR_STEM
    assert len(rows) == n and rows[-1]["total"] == n * stem + 512 * n * classes
    assert rows[-1]["trainable"] == stem + 512 * n * classes
    assert millions(rows[-1]["total"], want[1]) == want[0]


def test_every_der_preset_builds():
    names = ["cifar100-b0inc10", "cifar100-b0inc5", "cifar100-b0inc2", "imagenet100-b0inc10", "imagenet1000-b0inc100"]
    for name in names:
        cfg, _ = load_config([f"der/{name}"])
        assert cfg.method.name == "der" and cfg.model.name == "resnet18"
        assert cfg.memory.size == (20000 if "1000" in name else 2000)
        assert cfg.data.class_order.endswith("order1")


def test_bad_options_are_config_errors():
    from vitcl.errors import ConfigError

    for bad in ("method.retrain_temperature=0", "method.aux_weight=-1", "method.classifier_stage=prune",
                "data.augment.mixup_alpha=0.8"):
        with pytest.raises(ConfigError):
            load_config([BASE[0]], [bad])


def test_tiny_run_through_the_cli(tmp_path):
    rc = main(["run", *BASE, *TINY_RESNET, "data.train_per_class=60", "data.test_per_class=10",
               "train.epochs=3", "train.batch_size=32", "train.checkpoint_every=100", "run.threads=1", "train.lr=0.05",
               "method.retrain_epochs=10", "method.retrain_milestones=[8]", "method.retrain_temperature=1",
               "memory.size=60", f"run.out_dir={tmp_path}", "run.name=r", "-q"])
    assert rc == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    acc = res["class_il"]["acc_matrix"]
    assert len(acc) == 3 and acc[0][0] > 50 and res["class_il"]["last"] > 30  # chance: 10
    assert res["task_il"]["acc_matrix"][2][0] is not None
