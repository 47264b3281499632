"""E2E: the brightness / contrast augmentation against a pixel-by-pixel transcription, the balanced subset, the
cross-distilled loss of both phases, a tiny run, the presets and their #P (docs/methods/e2e.md)."""
import math

import pytest
import torch

from helpers import SMALL_BACKBONES, fit_on_backbone
from vitcl.engine.trainer import Trainer
from vitcl.methods.base import Batch
from vitcl.methods.e2e import adjust_brightness_contrast, balanced_subset, random_brightness_contrast
from vitcl.runconfig import load_config

TINY_RUN = ["data.train_per_class=30", "data.test_per_class=10", "data.increment=[4,3,3]", "model.width=8",
            "train.epochs=5", "train.batch_size=16", "eval.batch_size=64", "memory.size=60", "run.progress=false",
            "run.threads=1", "method.finetune_epochs=2", "method.finetune_milestones=[1]"]


def test_brightness_contrast_matches_pixel_arithmetic():
    g = torch.Generator().manual_seed(0)
    pix = torch.randint(0, 256, (3, 2, 4, 5), generator=g).float()
    mean, std = torch.tensor([0.4, 0.6]).view(1, 2, 1, 1), torch.tensor([0.2, 0.3]).view(1, 2, 1, 1)
    x = (pix / 255 - mean) / std
    delta, factor = torch.tensor([30.0, -63.0, 0.0]), torch.tensor([1.5, 0.2, 1.0])
    out = adjust_brightness_contrast(x, mean, std, delta, factor) * std + mean
    for i in range(3):
        for c in range(2):
            p = [[min(max(float(pix[i, c, h, w]) + float(delta[i]), 0.0), 255.0) for w in range(5)] for h in range(4)]
            mu = sum(sum(r) for r in p) / 20
            for h in range(4):
                for w in range(5):
                    want = min(max((p[h][w] - mu) * float(factor[i]) + mu, 0.0), 255.0)
                    assert float(out[i, c, h, w]) * 255 == pytest.approx(want, abs=1e-3)
    assert torch.allclose(adjust_brightness_contrast(x, mean, std, torch.zeros(3), torch.ones(3)), x, atol=1e-6)


def test_random_brightness_contrast_probability_and_ranges():
    mean, std = torch.tensor([0.5]).view(1, 1, 1, 1), torch.tensor([0.25]).view(1, 1, 1, 1)
    x = (torch.full((200, 1, 3, 3), 128.0) / 255 - mean) / std
    assert torch.equal(random_brightness_contrast(x, mean, std, 63, (0.2, 1.8), p=0.0), x)
    torch.manual_seed(0)
    out = random_brightness_contrast(x, mean, std, 63, (0.2, 1.8), p=1.0) * std + mean
    shift = out[:, 0, 0, 0] * 255 - 128  # flat images: contrast does nothing, the shift is the brightness
    assert float(shift.abs().max()) <= 63 + 1e-3 and float(shift.abs().min()) > 0
    assert float(shift.min()) < -30 and float(shift.max()) > 30  # both signs, spread over the range


def test_balanced_subset():
    old = {0: torch.tensor([5, 6, 7, 8]), 1: torch.tensor([9, 10, 11, 12])}
    rows = torch.arange(20, 40)
    labels = torch.tensor([2] * 10 + [3] * 10)
    sub = balanced_subset(old, rows, labels, 3, seed=1)
    assert sub[:6].tolist() == [5, 6, 7, 9, 10, 11]  # the first m exemplars of each old class
    new = sub[6:]
    assert sorted(int(labels[r - 20]) for r in new) == [2, 2, 2, 3, 3, 3]
    assert torch.equal(balanced_subset(old, rows, labels, 3, seed=1), sub)
    assert not torch.equal(balanced_subset(old, rows, labels, 3, seed=2), sub)


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


def trainer(tmp_path, *extra):
    cfg, _ = load_config(["e2e/digits-b0inc2"], [*TINY_RUN, f"run.out_dir={tmp_path}", *extra])
    (tmp_path / "r").mkdir(parents=True)
    return Trainer(cfg, tmp_path / "r", progress=False)


def test_cross_distilled_losses(tmp_path):
    tr = trainer(tmp_path, "method.color_augment=false", "data.increment=[2,3,5]", "method.kd_weight=0.7")
    m, s = tr.method, tr.scenario
    for t in range(3):
        m.begin_task(s[t])  # teacher: the 5-class model (tasks of 2 and 3 classes); student: 10 classes
    train, balanced = m.phases(s[2])
    assert balanced.name == "balanced" and balanced.epochs == 2 and balanced.lr == pytest.approx(2.0e-4)
    assert balanced.schedule == "multistep" and balanced.milestones == [1] and train.milestones != [1]
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 6, 9])
    batch = Batch(x=x, y=y, task=torch.zeros(4, dtype=torch.long), index=torch.arange(4))
    m.model.eval()
    with torch.no_grad():
        z, zt = m.model(x), m.teacher(x)
        cross = slow_soft_ce(z[:, :2], zt[:, :2], 2.0) + slow_soft_ce(z[:, 2:5], zt[:, 2:5], 2.0)
        loss, _ = m.loss(batch, train, s[2])
        assert float(loss) == pytest.approx(slow_ce(z, y) + 0.7 * cross, rel=1e-5)
        m.setup_phase(balanced, s[2])
        m.model.eval()
        for p in m.model.head.heads[2].parameters():
            p.add_(0.5)  # the model moves away from the finetuning teacher
        z2, zf = m.model(x), m.finetune_teacher(x)
        loss, logs = m.loss(batch, balanced, s[2])
        cross2 = slow_soft_ce(z2[:, :2], zt[:, :2], 2.0) + slow_soft_ce(z2[:, 2:5], zt[:, 2:5], 2.0)
        want = slow_ce(z2, y) + 0.7 * cross2 + 0.7 * slow_soft_ce(z2[:, 5:], zf[:, 5:], 2.0)
        assert float(loss) == pytest.approx(want, rel=1e-5) and "kd_new" in logs
    # without a memory there is no balanced subset, hence no balanced phase
    bare = trainer(tmp_path / "bare", "memory.size=0").method
    assert [p.name for p in bare.phases(s[1])] == ["train"]


def test_tiny_run_finetunes_on_a_balanced_subset(tmp_path):
    tr = trainer(tmp_path)
    m = tr.method
    seen: dict = {}
    loss = m.loss

    def spy(batch, phase, task):
        seen.setdefault((task.index, phase.name), []).extend(batch.index.tolist())
        return loss(batch, phase, task)
    m.loss = spy
    res = tr.fit()
    s = tr.scenario
    for t in (1, 2):
        rows = torch.tensor(seen[(t, "balanced")])
        counts = torch.bincount(s.train_labels[rows], minlength=s[t].end)
        per_class = 60 // s[t].end
        assert counts.tolist() == [per_class * 2] * s[t].end  # 2 epochs over m rows of every seen class
    cil, til = res["class_il"]["seen_acc"], res["task_il"]["seen_acc"]
    assert cil[0] > 40 and cil[-1] > 15 and til[-1] > 40


PRESETS = [f"e2e/{p}" for p in ("cifar100-b0inc10", "cifar100-b0inc5", "cifar100-b0inc2", "imagenet100-b0inc10",
                                "imagenet1000-b0inc100", "digits-b0inc2")]
PARAMS = {"e2e/cifar100-b0inc10": 11.22, "e2e/imagenet100-b0inc10": 11.22, "e2e/imagenet1000-b0inc100": 11.68}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build(preset):
    from vitcl.cli import param_rows

    cfg, _ = load_config([preset])
    assert cfg.method.name == "e2e" and cfg.method.temperature == 2.0
    if preset in PARAMS:
        rows, _ = param_rows(cfg)
        assert len(rows) == 10
        assert math.floor(rows[-1]["total"] / 1e4 + 1e-9) / 100 == PARAMS[preset]


@pytest.mark.parametrize("backbone", sorted(SMALL_BACKBONES))
def test_other_backbones(tmp_path, backbone):
    res = fit_on_backbone("e2e/digits-b0inc2", backbone, tmp_path, "method.finetune_epochs=1")
    assert res["tasks_done"] == 2 and len(res["class_il"]["seen_acc"]) == 2


def test_finetuning_teacher_survives_a_checkpoint(tmp_path):
    """A run resumed inside the balanced phase distils towards the same temporary teacher, not the resumed model."""
    tr = trainer(tmp_path)
    m, s = tr.method, tr.scenario
    m.begin_task(s[0])
    m.begin_task(s[1])
    balanced = m.phases(s[1])[1]
    m.setup_phase(balanced, s[1])
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(0.1)  # finetuning moved the model
    state = m.state_dict()
    fresh = type(m)(tr.cfg, s, m.device)
    fresh.begin_task(s[0])
    fresh.begin_task(s[1])
    fresh.load_state_dict(state)
    fresh.setup_phase(balanced, s[1])  # the engine sets the phase up again on resume
    want = m.finetune_teacher.state_dict()
    assert all(torch.equal(v, fresh.finetune_teacher.state_dict()[k]) for k, v in want.items())
    fresh.end_task(s[1])
    assert fresh.finetune_teacher is None
