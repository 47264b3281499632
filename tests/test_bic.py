"""BiC: the bias correction against its formula, the seeded balanced held-out split, the loss of each stage, a
tiny run that keeps the held-out rows out of stage 1 and trains only the newest (alpha, beta) in stage 2, the
presets and their #P (docs/methods/bic.md)."""
import math

import pytest
import torch

from helpers import SMALL_BACKBONES, fit_on_backbone
from vitcl.engine.trainer import Trainer
from vitcl.methods.base import Batch
from vitcl.methods.bic import bias_correction, holdout_split, split_seed
from vitcl.runconfig import load_config

TINY_RUN = ["data.train_per_class=40", "data.test_per_class=10", "data.increment=[4,3,3]", "model.width=8",
            "train.epochs=5", "train.batch_size=16", "eval.batch_size=64", "memory.size=120", "run.progress=false",
            "run.threads=1", "method.bias_epochs=2"]


def test_bias_correction_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    o = torch.randn(4, 7, generator=g)
    bounds = [0, 4, 6, 7]
    alphas, betas = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, -1.0, 0.25])
    q = bias_correction(o, bounds, alphas, betas)
    for i in range(4):
        for c in range(7):
            t = max(g for g in range(3) if bounds[g] <= c)
            assert float(q[i, c]) == pytest.approx(float(alphas[t]) * float(o[i, c]) + float(betas[t]), abs=1e-6)
    # identity layers leave the logits as they are
    assert torch.equal(bias_correction(o, bounds, torch.ones(3), torch.zeros(3)), o)


def test_holdout_split_is_seeded_balanced_and_disjoint():
    rows = torch.arange(100, 160)
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    kept, held = holdout_split(rows, labels, 4, seed=7)
    again_kept, again_held = holdout_split(rows, labels, 4, seed=7)
    assert torch.equal(held, again_held) and torch.equal(kept, again_kept)
    assert not torch.equal(holdout_split(rows, labels, 4, seed=8)[1], held)
    lab = {int(r): int(c) for r, c in zip(rows, labels)}
    assert [sum(lab[int(r)] == c for r in held) for c in range(3)] == [4, 4, 4]  # balanced over classes
    assert set(kept.tolist()).isdisjoint(held.tolist())
    assert sorted(kept.tolist() + held.tolist()) == rows.tolist()
    assert split_seed(0, 1) != split_seed(0, 2) and split_seed(0, 1) == split_seed(0, 1)


def trainer(tmp_path, *extra):
    cfg, _ = load_config(["bic/digits-b0inc2"], [*TINY_RUN, f"run.out_dir={tmp_path}", *extra])
    (tmp_path / "r").mkdir(parents=True)
    return Trainer(cfg, tmp_path / "r", progress=False)


def slow_ce(z, y):
    return -sum(math.log(math.exp(float(z[i, y[i]])) / sum(math.exp(float(v)) for v in z[i]))
                for i in range(len(y))) / len(y)


def slow_soft_ce(s, t, T):
    total = 0.0
    for i in range(s.shape[0]):
        pt = [math.exp(float(v) / T) for v in t[i]]
        ps = [math.exp(float(v) / T) for v in s[i]]
        total -= sum(a / sum(pt) * math.log(b / sum(ps)) for a, b in zip(pt, ps))
    return total / s.shape[0]


def test_stage_losses(tmp_path):
    tr = trainer(tmp_path)
    m, s = tr.method, tr.scenario
    m.begin_task(s[0])
    m.begin_task(s[1])
    with torch.no_grad():
        m.model.bias_layers[0].alpha.fill_(0.8)  # an earlier task's correction stays applied
        m.model.bias_layers[1].alpha.fill_(0.5)
        m.model.bias_layers[1].beta.fill_(-0.3)
    torch.manual_seed(0)
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 3, 4, 5, 6])
    batch = Batch(x=x, y=y, task=torch.zeros(5, dtype=torch.long), index=torch.arange(5))
    m.model.eval()
    train, bias = m.phases(s[1])
    assert [train.name, bias.name] == ["train", "bias"] and bias.epochs == 2
    with torch.no_grad():
        o = m.model.head(m.model.backbone(x))
        q = torch.cat([0.8 * o[:, :4], 0.5 * o[:, 4:] - 0.3], 1)
        zt = m.teacher(x)
        loss, _ = m.loss(batch, train, s[1])
        lam = 4 / 7
        assert float(loss) == pytest.approx((1 - lam) * slow_ce(q, y) + lam * slow_soft_ce(q[:, :4], zt, 2.0),
                                            rel=1e-5)
        loss, _ = m.loss(batch, bias, s[1])
        assert float(loss) == pytest.approx(slow_ce(q, y), rel=1e-5)
        m.opts.bias_loss = "softmax_ce"  # PyCIL's: the cross-entropy of the probabilities
        loss, _ = m.loss(batch, bias, s[1])
        assert float(loss) == pytest.approx(slow_ce(q.softmax(1), y), rel=1e-5)


def test_tiny_run_holds_out_and_corrects_only_the_newest_task(tmp_path):
    tr = trainer(tmp_path)
    m = tr.method
    seen: dict = {}
    snaps: dict = {}
    loss, setup, consolidate = m.loss, m.setup_phase, m.consolidate

    def spy_loss(batch, phase, task):
        seen.setdefault((task.index, phase.name), set()).update(batch.index.tolist())
        return loss(batch, phase, task)

    def spy_setup(phase, task):
        setup(phase, task)
        if phase.name == "bias":
            snaps[task.index] = {k: v.clone() for k, v in m.model.state_dict().items()}

    def spy_consolidate(task, ctx):
        if task.index in snaps:
            before, after = snaps[task.index], m.model.state_dict()
            changed = {k for k in after if not torch.equal(before[k], after[k])}
            assert changed == {f"bias_layers.{task.index}.alpha", f"bias_layers.{task.index}.beta"}
        consolidate(task, ctx)

    m.loss, m.setup_phase, m.consolidate = spy_loss, spy_setup, spy_consolidate
    res = tr.fit()
    s = tr.scenario
    assert set(snaps) == {1, 2}
    for t in (1, 2):
        held, trained = seen[(t, "bias")], seen[(t, "train")]
        assert held and held.isdisjoint(trained)
        labels = s.train_labels[torch.tensor(sorted(held))]
        counts = torch.bincount(labels, minlength=s[t].end)
        k = int(0.1 * (120 // s[t].offset))  # a tenth of the old classes' per-class memory
        assert counts.tolist() == [k] * s[t].end  # k per seen class: old (exemplars) and new alike
    assert seen[(0, "train")] == set(s[0].train_idx.tolist())  # task 0: nothing held out
    # a run resumed from task 0's checkpoint draws the same held-out rows (seeded, from the restored memory)
    from vitcl.engine import checkpoint

    again = trainer(tmp_path / "again")
    again.restore(checkpoint.load(tr.run_dir / "checkpoints" / "task_0.pt"))
    again.method.begin_task(s[1])
    bias = again.method.phases(s[1])[1]
    assert set(again.phase_indices(bias, s[1]).tolist()) == seen[(1, "bias")]
    cil, til = res["class_il"]["seen_acc"], res["task_il"]["seen_acc"]
    assert cil[0] > 40 and cil[-1] > 15 and til[-1] > 40


PRESETS = [f"bic/{p}" for p in ("cifar100-b0inc10", "cifar100-b0inc5", "cifar100-b0inc2", "imagenet100-b0inc10",
                                "imagenet1000-b0inc100", "digits-b0inc2")]
PARAMS = {"bic/cifar100-b0inc10": 11.22, "bic/imagenet100-b0inc10": 11.22, "bic/imagenet1000-b0inc100": 11.68}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build(preset):
    from vitcl.cli import param_rows

    cfg, _ = load_config([preset])
    assert cfg.method.name == "bic" and cfg.method.val_ratio == 0.1
    if preset in PARAMS:
        rows, _ = param_rows(cfg)
        assert len(rows) == 10
        assert math.floor(rows[-1]["total"] / 1e4 + 1e-9) / 100 == PARAMS[preset]
        assert rows[-1]["growth"] == rows[1]["growth"] * 9  # a head and one (alpha, beta) per task


@pytest.mark.parametrize("backbone", sorted(SMALL_BACKBONES))
def test_other_backbones(tmp_path, backbone):
    res = fit_on_backbone("bic/digits-b0inc2", backbone, tmp_path)
    assert res["tasks_done"] == 2 and len(res["class_il"]["seen_acc"]) == 2


def test_keep_corrections_false_resets_earlier_layers_but_not_the_teachers(tmp_path):
    tr = trainer(tmp_path, "method.keep_corrections=false")
    m, s = tr.method, tr.scenario
    m.begin_task(s[0])
    m.begin_task(s[1])
    with torch.no_grad():
        m.model.bias_layers[1].alpha.fill_(0.5)
        m.model.bias_layers[1].beta.fill_(0.2)
    m.begin_task(s[2])
    assert [float(b.alpha.detach()) for b in m.model.bias_layers] == [1.0, 1.0, 1.0]
    assert float(m.teacher.bias_layers[1].alpha) == 0.5 and float(m.teacher.bias_layers[1].beta) == pytest.approx(0.2)
