"""LwF: its distillation and task-restricted cross-entropy against slow transcriptions, the loss it trains with,
the old heads' freezing, a tiny run on a ViT, and the presets."""
import math

import pytest
import torch

from vitcl.cli import param_rows
from vitcl.data.build import build_scenario
from vitcl.engine.trainer import Trainer
from vitcl.methods import METHODS, Batch
from vitcl.methods.losses import soft_distillation, task_cross_entropy
from vitcl.runconfig import load_config

TINY_VIT = ["model.name=vit", "model.patch_size=4", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
            "data.train_per_class=40", "data.test_per_class=10", "data.increment=[4,3,3]",
            "data.augment.crop_padding=0", "train.optimizer=adamw", "train.lr=1e-2", "train.weight_decay=0.01",
            "train.epochs=5", "train.batch_size=16", "eval.batch_size=64", "run.threads=1"]


def test_soft_distillation_is_lwfs_softened_cross_entropy():
    torch.manual_seed(0)
    s, t, T = torch.randn(4, 5), torch.randn(4, 5), 2.0
    total = 0.0
    for i in range(4):
        zs = [math.exp(s[i, c].item() / T) for c in range(5)]
        zt = [math.exp(t[i, c].item() / T) for c in range(5)]
        total += -sum(zt[c] / sum(zt) * math.log(zs[c] / sum(zs)) for c in range(5))
    assert soft_distillation(s, t, T).item() == pytest.approx(total / 4, rel=1e-5)
    # the paper's form: softmax(z)^(1/T) renormalised is softmax(z / T)
    p = torch.softmax(t, 1) ** (1 / T)
    q = torch.softmax(s, 1) ** (1 / T)
    direct = -(p / p.sum(1, keepdim=True) * (q / q.sum(1, keepdim=True)).log()).sum(1).mean()
    assert soft_distillation(s, t, T).item() == pytest.approx(direct.item(), rel=1e-5)


def test_task_cross_entropy_uses_the_current_tasks_classes_only():
    torch.manual_seed(0)
    logits = torch.randn(3, 6)
    y = torch.tensor([4, 5, 4])
    batch = Batch(x=torch.zeros(3), y=y, task=torch.ones(3, dtype=torch.long), index=torch.arange(3))
    want = 0.0
    for i in range(3):
        row = [logits[i, c].item() for c in range(4, 6)]
        want += -(row[y[i] - 4] - math.log(sum(math.exp(v) for v in row)))
    assert task_cross_entropy(logits, batch, 4, "task").item() == pytest.approx(want / 3, rel=1e-5)
    full = torch.nn.functional.cross_entropy(logits, y)
    assert task_cross_entropy(logits, batch, 4, "all").item() == pytest.approx(full.item(), rel=1e-6)
    with pytest.raises(RuntimeError, match="old class"):  # checked on the device (torch._assert_async)
        task_cross_entropy(logits, Batch(x=batch.x, y=torch.tensor([1, 5, 4]), task=batch.task, index=batch.index),
                           4, "task")


def _method(*overrides):
    cfg, _ = load_config(["lwf/digits-b0inc2"], [*TINY_VIT, *overrides])
    torch.manual_seed(0)
    return METHODS.get("lwf")(cfg, build_scenario(cfg.data), torch.device("cpu"))


def test_the_loss_is_new_task_ce_plus_lamb_times_kd_towards_the_frozen_copy():
    m = _method("method.lamb=0.7")
    s = m.scenario
    m.begin_task(s[0])
    assert m.teacher is None
    m.begin_task(s[1])
    assert m.teacher is not None and not any(p.requires_grad for p in m.teacher.parameters())
    phase = m.phases(s[1])[0]
    m.setup_phase(phase, s[1])
    idx = s[1].train_idx[:8]
    x = s.train.images[idx].float() / 255
    y = s.train_labels[idx]
    batch = Batch(x=x, y=y, task=torch.ones_like(y), index=idx)
    loss, logs = m.loss(batch, phase, s[1])
    logits = m.model(x)
    with torch.no_grad():
        old = m.teacher(x)
    assert old.shape[1] == 4 and logits.shape[1] == 7
    ce = torch.nn.functional.cross_entropy(logits[:, 4:], y - 4)
    kd = soft_distillation(logits[:, :4], old, 2.0)
    assert loss.item() == pytest.approx((ce + 0.7 * kd).item(), rel=1e-5)
    assert set(logs) == {"ce", "kd"}


def test_freeze_old_heads_keeps_them_out_of_the_optimiser():
    m = _method("method.freeze_old_heads=true")
    s = m.scenario
    for t in (0, 1):
        m.begin_task(s[t])
    m.setup_phase(m.phases(s[1])[0], s[1])
    heads = list(m.model.head.heads)
    assert not any(p.requires_grad for p in heads[0].parameters())
    assert all(p.requires_grad for p in heads[1].parameters())


def test_tiny_lwf_run_on_a_vit(tmp_path):
    cfg, _ = load_config(["lwf/digits-b0inc2"], TINY_VIT)
    res = Trainer(cfg, tmp_path, progress=False).fit()
    cil, til = res["class_il"], res["task_il"]
    assert res["tasks_done"] == 3 and res["model"] == "vit" and "extra" not in res
    assert cil["acc_matrix"][0][0] > 50  # 4 classes: chance is 25
    assert cil["last"] > 15 and til["last"] > 45  # without memory old classes fade in class-IL, less in task-IL


@pytest.mark.parametrize("preset,want", [("lwf/cifar100-b0inc10", 11.22), ("lwf/cifar100-b0inc5", 11.22),
                                         ("lwf/cifar100-b0inc2", 11.22), ("lwf/imagenet100-b0inc10", 11.22)])
def test_presets_build_with_the_tables_backbone(preset, want):
    cfg, _ = load_config([preset])
    assert cfg.memory.size == 0 and cfg.method.lamb == 1.0 and cfg.method.temperature == 2.0
    rows, _ = param_rows(cfg)
    assert math.floor(rows[-1]["total"] / 1e4) / 100 == want
