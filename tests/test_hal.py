"""HAL: the anchor loss, the anchor objective and the running means against slow transcriptions, the step's anchor
gradient against a temporary step taken by hand, the anchors built at each task end and their ascent, a run resumed
inside a task, the config checks and a run through the CLI."""
import copy
import json
import math

import pytest
import torch

from helpers import interrupt_at_epoch, restored, run_cli
from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.methods.hal import anchor_loss, anchor_objective
from vitcl.runconfig import load_config

TINY = ["data.train_per_class=24", "data.test_per_class=10", "data.increment=[4,3,3]", "model.width=8",
        "memory.size=30", "train.epochs=2", "train.max_batches=2", "train.batch_size=16", "eval.batch_size=64",
        "method.memory_batch=8", "method.anchor_steps=3", "run.threads=1", "run.progress=false"]


def hal_trainer(run_dir, *overrides):
    cfg, _ = load_config(["hal/digits-b0inc2"], [*TINY, *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, run_dir, progress=False)


def slow_cross_entropy(row, label):
    return math.log(sum(math.exp(v) for v in row)) - row[label]


def test_anchor_loss_is_the_transcription():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    slow = sum((x - y) ** 2 for ra, rb in zip(a.tolist(), b.tolist()) for x, y in zip(ra, rb)) / 15
    assert anchor_loss(a, b).item() == pytest.approx(slow, rel=1e-6)
    assert anchor_loss(a, a).item() == 0.0


def test_anchor_objective_is_the_transcription():
    gen = torch.Generator().manual_seed(1)
    tuned, logits = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    feats, means = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    labels = torch.tensor([0, 5, 2, 2])
    got = anchor_objective(tuned, logits, feats, means, labels, 0.3)
    for i, y in enumerate(labels.tolist()):
        distance = sum((f - m) ** 2 for f, m in zip(feats[i].tolist(), means[i].tolist()))
        slow = slow_cross_entropy(tuned[i].tolist(), y) - slow_cross_entropy(logits[i].tolist(), y) - 0.3 * distance
        assert got[i].item() == pytest.approx(slow, rel=1e-5)


@pytest.mark.parametrize("mode", ["class", "task"])
def test_running_means_are_the_transcription(tmp_path, mode):
    m = hal_trainer(tmp_path, f"method.feature_mean={mode}", "method.beta=0.25").method
    gen = torch.Generator().manual_seed(2)
    steps = [(torch.randn(6, m.means.shape[1], generator=gen), torch.tensor([0, 0, 1, 3, 1, 0])),
             (torch.randn(4, m.means.shape[1], generator=gen), torch.tensor([3, 2, 2, 3]))]
    expected = {}
    for feats, labels in steps:
        m.update_means(feats, labels)
        groups = labels.tolist() if mode == "class" else [0] * len(labels)
        for g in set(groups):
            rows = [f for f, k in zip(feats.tolist(), groups) if k == g]
            mean = [sum(col) / len(rows) for col in zip(*rows)]
            old = expected.get(g, [0.0] * len(mean))
            expected[g] = [0.25 * o + 0.75 * v for o, v in zip(old, mean)]
    for g, mean in expected.items():
        assert m.means[g].tolist() == pytest.approx(mean, rel=1e-5, abs=1e-6)
    assert int((m.means.abs().sum(1) > 0).sum()) == len(expected)  # the other classes' means stay zero


def test_the_step_adds_the_anchor_gradient_of_a_temporary_step(tmp_path):
    tr = hal_trainer(tmp_path, "method.anchor_lambda=0.7")
    m, task = tr.method, tr.scenario[0]
    m.begin_task(task)
    m.model.eval()  # batch norm on its running statistics: the same function for every evaluation below
    gen = torch.Generator().manual_seed(3)
    m.anchors = torch.rand(3, *m.anchors.shape[1:], generator=gen)
    x = torch.randn(5, *m.anchors.shape[1:], generator=gen)
    m.model(x).square().mean().backward()  # some gradient g of the step's loss
    params = [p for p in m.model.parameters()]
    g = [p.grad.clone() for p in params]
    phase = m.phases(task)[0]
    m.before_step([], phase, task)
    # by hand: theta~ = theta - lr g in a copy, its outputs on the anchors, the gradient of the loss at theta
    temporary = copy.deepcopy(m.model)
    with torch.no_grad():
        for q, grad in zip(temporary.parameters(), g):
            q -= phase.lr * grad
        reference = temporary(m.anchors)
    out = m.model(m.anchors)
    loss = 0.7 * ((out - reference) ** 2).sum() / out.numel()
    expected = torch.autograd.grad(loss, params)
    assert loss.item() > 0
    for p, g0, e in zip(params, g, expected):
        assert torch.allclose(p.grad - g0, e, atol=1e-7, rtol=1e-4)



@pytest.mark.parametrize("mode", ["keep", "update"])
def test_anchor_passes_keep_or_update_the_batch_norm_statistics(tmp_path, mode):
    """keep: the anchors' train-mode passes normalise with their batch's statistics and leave the running ones as
    they were; update (Mammoth's): the running statistics move toward the anchors'."""
    tr = hal_trainer(tmp_path, f"method.anchor_norm_stats={mode}")
    m, task = tr.method, tr.scenario[0]
    m.begin_task(task)
    m.model.train()
    gen = torch.Generator().manual_seed(4)
    m.anchors = torch.rand(3, *m.anchors.shape[1:], generator=gen) * 5
    m.model(torch.randn(4, *m.anchors.shape[1:], generator=gen)).square().mean().backward()
    norms = [mod for mod in m.model.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    before = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    momenta = [n.momentum for n in norms]
    m.before_step([], m.phases(task)[0], task)
    moved = [not (torch.equal(n.running_mean, mu) and torch.equal(n.running_var, var))
             for n, (mu, var) in zip(norms, before)]
    assert norms and (not any(moved) if mode == "keep" else all(moved))
    assert [n.momentum for n in norms] == momenta  # restored
    assert all(p.grad is not None for p in m.model.parameters())

def objective_by_hand(model, tuned, e, labels, means, gamma):
    """J per anchor from the networks' outputs (in eval mode, as the ascent) and the scalar transcription of its
    terms."""
    training = model.training
    model.eval()
    with torch.no_grad():
        feats, tl = model.backbone(e), tuned(e)
        logits = model.head(feats)
    model.train(training)
    return [slow_cross_entropy(tl[i].tolist(), y) - slow_cross_entropy(logits[i].tolist(), y)
            - gamma * float(((feats[i] - means[i]) ** 2).sum()) for i, y in enumerate(labels.tolist())]


def test_anchors_are_built_at_each_task_end_and_ascend_the_objective(tmp_path):
    tr = hal_trainer(tmp_path, "method.anchor_steps=5")
    m = tr.method
    built, ascents, anchor_steps = [], [], []
    consolidate, ascend, before_step = m.consolidate, m.ascend, m.before_step

    def spy_ascend(start, labels, tuned, means, lr):
        out = ascend(start, labels, tuned, means, lr)
        ascents.append((objective_by_hand(m.model, tuned, start, labels, means, m.opts.gamma),
                        objective_by_hand(m.model, tuned, out, labels, means, m.opts.gamma)))
        return out

    def spy_consolidate(task, ctx):
        consolidate(task, ctx)
        built.append((m.anchors.clone(), m.anchor_labels.tolist()))

    m.ascend, m.consolidate = spy_ascend, spy_consolidate
    m.before_step = lambda b, p, t: (anchor_steps.append(len(m.anchors)), before_step(b, p, t))
    tr.fit()
    assert [labels for _, labels in built] == [list(range(4)), list(range(7)), list(range(10))]  # one per class
    assert all(torch.equal(built[i + 1][0][: len(built[i][0])], built[i][0]) for i in range(2))  # kept
    assert anchor_steps == [0] * 4 + [4] * 4 + [7] * 4  # the anchor loss from the second task on
    for before, after in ascents:
        assert all(a > b for a, b in zip(after, before))


def test_one_ascent_step_is_the_objective_gradient(tmp_path):
    """In float64: one step moves each anchor by lr * dJ/de; checked along the step and a random direction by
    central differences of the transcribed J."""
    tr = hal_trainer(tmp_path, "method.anchor_steps=1")
    m, task = tr.method, tr.scenario[0]
    m.begin_task(task)
    m.model.double()
    tuned = copy.deepcopy(m.model)
    with torch.no_grad():
        for q in tuned.parameters():
            q.add_(0.05 * torch.randn_like(q))
    tuned.eval()
    gen = torch.Generator().manual_seed(4)
    start = torch.rand(2, *m.anchors.shape[1:], generator=gen, dtype=torch.float64)
    labels = torch.tensor([1, 3])
    means = torch.randn(2, m.means.shape[1], generator=gen, dtype=torch.float64)
    lr, gamma = 0.5, m.opts.gamma
    step = m.ascend(start, labels, tuned, means, lr) - start
    m.model.eval()
    direction = torch.randn(start.shape, generator=gen, dtype=torch.float64)
    for d in (step / lr, direction):
        eps = 1e-5 / float(d.norm())
        hi = objective_by_hand(m.model, tuned, start + eps * d, labels, means, gamma)
        lo = objective_by_hand(m.model, tuned, start - eps * d, labels, means, gamma)
        numeric = (sum(hi) - sum(lo)) / (2 * eps)
        assert numeric == pytest.approx(float((step / lr * d).sum()), rel=1e-4)


def test_a_run_resumed_mid_task_restores_its_anchors_and_means(tmp_path):
    full = hal_trainer(tmp_path / "a")
    full_res = full.fit()
    t = hal_trainer(tmp_path / "b")
    interrupt_at_epoch(t, 4)  # task 1, after its first epoch was checkpointed
    resumed = hal_trainer(tmp_path / "b")
    opt_state = restored(resumed, tmp_path / "b" / "checkpoints" / "last.pt")
    assert (resumed.state.task, resumed.state.epoch) == (1, 1)
    assert torch.equal(resumed.method.anchors, t.method.anchors) and len(resumed.method.anchors) == 4
    assert torch.equal(resumed.method.means, t.method.means) and resumed.method.means.abs().sum() > 0
    res = resumed.fit(opt_state)
    assert torch.equal(resumed.method.anchors, full.method.anchors)
    assert res["class_il"]["acc_matrix"] == full_res["class_il"]["acc_matrix"]


def test_hal_checks_its_config():
    for bad, key in ((["train.schedule=cosine"], "train.schedule"), (["method.beta=1.0"], "method.beta"),
                     (["method.anchor_steps=-1"], "method.anchor_steps"), (["memory.size=0"], "memory.size"),
                     (["method.feature_mean=batch"], "method.feature_mean")):
        with pytest.raises(ConfigError, match=key):
            load_config(["hal/digits-b0inc2"], bad)


def test_a_tiny_hal_run_through_the_cli(tmp_path):
    proc = run_cli("run", "-q", "hal/digits-b0inc2", *TINY, f"run.out_dir={tmp_path}", "run.name=hal", check=True)
    assert proc.returncode == 0
    results = json.loads((tmp_path / "hal" / "results.json").read_text())
    assert len(results["class_il"]["acc_matrix"]) == 3
