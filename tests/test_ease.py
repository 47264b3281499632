"""EASE: the prototype complement and the reweighted cosine scores against slow transcriptions of the reference's
loops; the prototypes of a tiny run against a per-class loop; the frozen backbone and old adapters unchanged; one
adapter per task in the parameter count; resume; the presets."""
import math

import pytest
import torch
import torch.nn.functional as F

from vitcl.cli import main, param_rows
from vitcl.data.build import build_scenario
from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.methods import METHODS
from vitcl.methods.ease import CosineHead, prototype_complement, subspace_weights
from vitcl.models.adapters import set_active_adapter
from vitcl.runconfig import load_config

TINY = ["method.name=ease", "model.name=vit", "model.patch_size=4", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "model.pool=token", "model.pretrained=null", "method.bottleneck=4",
        "data.train_per_class=20", "data.test_per_class=8", "data.increment=[4,3,3]", "data.augment.crop_padding=0",
        "train.optimizer=sgd", "train.lr=0.05", "train.weight_decay=0.0005", "train.min_lr=0", "train.epochs=2",
        "train.batch_size=16", "train.warmup_epochs=0", "eval.batch_size=64", "memory.size=0"]


# ------------------------------------------------------------------ formulas against the reference's loops
def slow_complement(W, bounds, d, first, recalc):
    """The reference's solve_sim_reset / solve_similarity on a flat (C, S*d) table, element by element."""
    W = W.clone()
    t = len(bounds) - 1
    for i in range(t):
        lo, hi = bounds[i]
        for k in (range(i + 1, t + 1) if recalc else [t]):
            nlo, nhi = bounds[k][0], bounds[t][1]
            old_dim, new_dim = slice((first + i) * d, (first + i + 1) * d), slice((first + k) * d, (first + k + 1) * d)
            A, B, A_hat = W[nlo:nhi, old_dim], W[nlo:nhi, new_dim], W[lo:hi, old_dim]
            sim = torch.zeros(len(A_hat), len(A))
            for a in range(len(A_hat)):
                for b in range(len(A)):
                    sim[a, b] = torch.cosine_similarity(A_hat[a], A[b], dim=0)
            sim = F.softmax(sim, dim=1)
            B_hat = torch.zeros(len(A_hat), d)
            for a in range(len(A_hat)):
                for b in range(len(A)):
                    B_hat[a] += sim[a, b] * B[b]
            W[lo:hi, new_dim] = B_hat
    return W


@pytest.mark.parametrize("recalc", [True, False])
@pytest.mark.parametrize("first", [0, 1])
def test_prototype_complement_matches_the_reference_loops(recalc, first):
    torch.manual_seed(0)
    bounds, d = [(0, 3), (3, 5), (5, 9), (9, 11)], 6
    S = first + len(bounds)
    W = torch.randn(11, S, d)
    got = prototype_complement(W, bounds, first, recalc)
    want = slow_complement(W.flatten(1), bounds, d, first, recalc).view(11, S, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the real prototypes are untouched: each task's classes in its own and earlier subspaces, the PTM's
    for i, (lo, hi) in enumerate(bounds):
        torch.testing.assert_close(got[lo:hi, : first + i + 1], W[lo:hi, : first + i + 1])
    # the old classes in the newest subspace are replaced (without recalc only there)
    assert not torch.allclose(got[0:3, first + 3], W[0:3, first + 3])
    if not recalc:
        torch.testing.assert_close(got[0:3, first + 1: first + 3], W[0:3, first + 1: first + 3])


def slow_reweight(x, weight, bounds, d, alpha, beta, use_init_ptm):
    """The reference's EaseCosineLinear.forward_reweight (sigma 1), on flat features and weights."""
    cur_task = len(bounds) - 1
    outs = []
    for i, (lo, hi) in enumerate(bounds):
        out = 0.0
        for j in range(weight.shape[1] // d):
            xi = F.normalize(x[:, j * d:(j + 1) * d], dim=1)
            wi = F.normalize(weight[lo:hi, j * d:(j + 1) * d], dim=1)
            if use_init_ptm and j == 0:
                out = out + beta * F.linear(xi, wi)
                continue
            own = (i + 1) if use_init_ptm else i
            out = out + (F.linear(xi, wi) if j == own else alpha * F.linear(xi, wi) / cur_task)
        outs.append(out)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("use_init_ptm", [False, True])
def test_scores_are_the_reference_reweighting(use_init_ptm):
    from vitcl.methods.ease import ease_scores

    torch.manual_seed(1)
    bounds, d, first = [(0, 2), (2, 5), (5, 7)], 5, int(use_init_ptm)
    S = first + len(bounds)
    feats, protos = torch.randn(4, S, d), torch.randn(7, S, d)
    w = subspace_weights(bounds, first, alpha=0.3, beta=0.7)
    got = ease_scores(feats, protos, w)
    want = slow_reweight(feats.flatten(1), protos.flatten(1), bounds, d, 0.3, 0.7, use_init_ptm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the first task alone: its own adapter at weight 1 (and the PTM at beta)
    w0 = subspace_weights(bounds[:1], first, alpha=0.3, beta=0.7)
    torch.testing.assert_close(w0, torch.tensor([([0.7] if first else []) + [1.0]] * 2))


def test_cosine_head_is_sigma_times_cosine():
    torch.manual_seed(0)
    head = CosineHead(6, 3)
    head.sigma.data.fill_(2.5)
    x = torch.randn(4, 6)
    for b in range(4):
        for c in range(3):
            want = 2.5 * torch.dot(x[b], head.weight[c]) / (x[b].norm() * head.weight[c].norm())
            assert head(x)[b, c].item() == pytest.approx(want.item(), rel=1e-5)
    bound = 1 / math.sqrt(6)
    assert head.weight.abs().max() <= bound and head.sigma.requires_grad


# ------------------------------------------------------------------ a tiny run on digits
@pytest.fixture(scope="module")
def ease_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ease")
    cfg, _ = load_config(["data/digits-b0inc2"], TINY)
    trainer = Trainer(cfg, tmp, progress=False)
    start = {k: v.clone() for k, v in trainer.method.model.backbone.state_dict().items()}
    res = trainer.fit()
    return trainer, res, start, tmp


def _backbone_params(model):
    return {k: v for k, v in model.backbone.state_dict().items() if ".adapters." not in k}


def test_run_learns_and_the_backbone_never_moves(ease_run):
    trainer, res, start, _ = ease_run
    assert res["tasks_done"] == 3 and res["class_il"]["last"] > 20  # 10 digits: chance is 10
    now = _backbone_params(trainer.method.model)
    plain = {k.replace(".block.", "."): v for k, v in now.items()}
    assert set(plain) == set(start)
    for k, v in plain.items():
        torch.testing.assert_close(v, start[k], rtol=0, atol=0, msg=k)


def test_old_adapters_do_not_change_when_a_new_task_trains(ease_run):
    trainer, _, _, run_dir = ease_run
    final = trainer.method.model.backbone.state_dict()
    fresh = Trainer(trainer.cfg, run_dir, progress=False)
    for t, _ in fresh.restore_task_checkpoints():
        sd = fresh.method.model.backbone.state_dict()
        adapters = {k: v for k, v in sd.items() if ".adapters." in k}
        assert {int(k.split(".adapters.")[1].split(".")[0]) for k in adapters} == set(range(t + 1))
        for k, v in adapters.items():  # every adapter is the same at the end as when its task ended
            torch.testing.assert_close(final[k], v, rtol=0, atol=0, msg=k)
        own = [v for k, v in adapters.items() if f".adapters.{t}.up.weight" in k]
        assert all(v.abs().sum() > 0 for v in own)  # it trained (up starts at zero)


def _normalised(scenario, images):
    x = images.float() / 255
    return (x - torch.tensor(scenario.mean).view(1, -1, 1, 1)) / torch.tensor(scenario.std).view(1, -1, 1, 1)


def test_prototypes_are_per_class_means_in_every_subspace(ease_run):
    """Task t's classes have real prototypes in subspaces 0..t (those adapters are frozen from then on), the
    mean class-token feature of their training images, one at a time; later subspaces hold the complement."""
    trainer, _, _, _ = ease_run
    m, sc = trainer.method, trainer.scenario
    model = m.model.eval()
    protos = model.prototypes.clone()
    assert protos.shape == (10, 3, 16)
    try:
        for t in range(3):
            task = sc[t]
            for c in range(task.offset, task.end):
                rows = task.train_idx[sc.train_labels[task.train_idx] == c].tolist()
                for s in range(t + 1):
                    set_active_adapter(model.backbone, s)
                    with torch.no_grad():
                        feats = [model.backbone(_normalised(sc, sc.train.images[r:r + 1]))[0] for r in rows]
                    torch.testing.assert_close(protos[c, s], sum(feats) / len(rows), rtol=1e-4, atol=1e-5)
    finally:
        set_active_adapter(model.backbone, m.task_index)
    bounds = [(sc[t].offset, sc[t].end) for t in range(3)]
    torch.testing.assert_close(prototype_complement(protos, bounds, 0, True), protos)  # a fixed point


def test_scores_of_the_run_are_the_weighted_cosines(ease_run):
    trainer, _, _, _ = ease_run
    m, sc = trainer.method, trainer.scenario
    m.model.eval()
    x = _normalised(sc, sc.test.images[:5])
    with torch.no_grad():
        got = m.logits(x)
        feats = []
        for s in range(3):
            set_active_adapter(m.model.backbone, s)
            feats.append(m.model.backbone(x))
        set_active_adapter(m.model.backbone, 2)
    bounds = [(sc[t].offset, sc[t].end) for t in range(3)]
    want = slow_reweight(torch.cat(feats, 1), m.model.prototypes.flatten(1), bounds, 16, 0.1, 0.0, False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_only_the_new_adapter_and_head_train_and_frozen_parts_stay_in_eval(ease_run):
    trainer, _, _, _ = ease_run
    m = trainer.method
    task = trainer.scenario[2]
    m.setup_phase(m.phases(task)[0], task)
    trainable = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.2." in n or n.startswith("head.") for n in trainable)
    assert {n for n in trainable if n.startswith("head.")} == {"head.weight", "head.sigma"}
    m.model.train()  # as the engine does after an extraction or a periodic evaluation
    for name, mod in m.model.backbone.named_modules():
        assert mod.training == ("adapters.2" in name), name
    assert m.model.head.training


def test_resume_restores_prototypes_and_scores(ease_run):
    trainer, _, _, run_dir = ease_run
    m, sc = trainer.method, trainer.scenario
    x = _normalised(sc, sc.test.images[:6])
    m.model.eval()
    with torch.no_grad():
        want = m.logits(x)
    fresh = Trainer(trainer.cfg, run_dir, progress=False)
    restored = dict(fresh.restore_task_checkpoints())
    assert sorted(restored) == [0, 1, 2]
    r = fresh.method
    r.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(r.logits(x), want)
    torch.testing.assert_close(r.model.prototypes, m.model.prototypes)


# ------------------------------------------------------------------ parameter count, presets
def test_parameter_count_grows_by_one_adapter_per_task():
    cfg, _ = load_config(["data/digits-b0inc2"], TINY)
    rows, _ = param_rows(cfg)
    D, r, depth = 16, 4, 2
    adapter = depth * (D * r + r + r * D + D)
    first = rows[0]
    vit = first["total"] - adapter - (4 * D + 1) - 4 * 1 * D  # backbone = total - adapter - head - prototypes
    for t, row in enumerate(rows):
        n_cls = [4, 3, 3][t]
        seen = [4, 7, 10][t]
        assert row["total"] == vit + (t + 1) * adapter + (n_cls * D + 1) + seen * (t + 1) * D
        assert row["trainable"] == adapter + n_cls * D + 1
    m = METHODS.get("ease")(cfg, build_scenario(cfg.data, shapes_only=True), torch.device("cpu"))
    assert vit == sum(p.numel() for p in m.model.backbone.parameters())  # before any adapter


def test_presets_load_and_ease_needs_a_vit():
    for preset in ("ease/cifar100-b0inc5-vitb16in21k", "ease/fashion-mnist-b0inc2-pretrained"):
        cfg, _ = load_config([preset])
        assert cfg.method.name == "ease" and cfg.model.name == "vit" and cfg.model.pool == "token"
    cfg, _ = load_config(["ease/cifar100-b0inc5-vitb16in21k"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.method.bottleneck) == (0.025, 20, 48, 64)
    with pytest.raises(ConfigError, match="model.name"):
        load_config(["ease/fashion-mnist-b0inc2-pretrained"], ["model.name=resnet18"])
    with pytest.raises(ConfigError, match="method.alpha"):
        load_config(["ease/fashion-mnist-b0inc2-pretrained"], ["method.alpha=-1"])


def test_params_cli_on_vit_b16(capsys):
    assert main(["params", "ease/cifar100-b0inc5-vitb16in21k", "model.pretrained=null"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first, last = lines[-20].split(), lines[-1].split()
    adapter = 12 * (768 * 64 + 64 + 64 * 768 + 768)
    assert first[0] == "1" and last[0] == "20"
    total_first, total_last = (int(v.replace(",", "")) for v in (first[2], last[2]))
    # 19 more adapters and the prototype table of 100 classes x 20 subspaces (5 x 1 at the first task)
    assert total_last - total_first == 19 * adapter + 768 * (100 * 20 - 5)
