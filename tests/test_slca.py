"""SLCA: the class Gaussians against a slow loop, the sampling's shapes and statistics (seeded), the normalised-
logit alignment loss against a transcription of the reference's loop, the lr groups (slow backbone), a tiny run
(statistics, the heads' backup and recall, resume), the presets and the parameter count."""
import pytest
import torch
import torch.nn.functional as F

from vitcl.cli import main, param_rows
from vitcl.engine.optim import build_optimizer
from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.methods.slca import alignment_loss, class_gaussians, sample_features
from vitcl.runconfig import load_config

# mean pooling: a random ViT's class token barely varies between images, and a linear head on it learns nothing
TINY = ["method.name=slca", "model.name=vit", "model.patch_size=4", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "model.pool=mean", "model.pretrained=null", "data.train_per_class=20",
        "data.test_per_class=8", "data.increment=[4,3,3]", "data.augment.crop_padding=0", "train.optimizer=sgd",
        "train.lr=0.2", "train.weight_decay=0.0005", "train.schedule=multistep", "train.milestones=[2]",
        "train.epochs=3", "train.batch_size=16", "train.warmup_epochs=0", "eval.batch_size=64", "memory.size=0",
        "method.backbone_lr_scale=0.1", "method.ca_epochs=2", "method.ca_samples=32"]


# ------------------------------------------------------------------ formulas
def test_class_gaussians_match_a_slow_loop():
    torch.manual_seed(0)
    feats = torch.randn(30, 4)
    labels = torch.tensor([2, 0, 5] * 10)
    classes, means, covs = class_gaussians(feats, labels, eps=1e-4)
    assert classes.tolist() == [0, 2, 5] and means.dtype == covs.dtype == torch.float64
    for k, c in enumerate([0, 2, 5]):
        rows = [feats[i].double() for i in range(30) if labels[i] == c]
        mu = sum(rows) / len(rows)
        cov = torch.zeros(4, 4, dtype=torch.float64)
        for a in range(4):
            for b in range(4):
                cov[a, b] = sum((r[a] - mu[a]) * (r[b] - mu[b]) for r in rows) / (len(rows) - 1)
        torch.testing.assert_close(means[k], mu)
        torch.testing.assert_close(covs[k], cov + 1e-4 * torch.eye(4, dtype=torch.float64))


def test_sampling_shapes_order_and_statistics():
    torch.manual_seed(0)
    d = 3
    means = torch.tensor([[0.0, 1.0, -2.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    a = torch.randn(2, d, d, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) + 0.1 * torch.eye(d, dtype=torch.float64)
    x, y = sample_features(means, covs.float(), 4, torch.Generator().manual_seed(1))
    assert x.shape == (8, d) and x.dtype == torch.float32 and y.tolist() == [0] * 4 + [1] * 4
    x2, _ = sample_features(means, covs.float(), 4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, x2)  # seeded: the same draw
    big, yb = sample_features(means, covs.float(), 40000, torch.Generator().manual_seed(2))
    for c in range(2):
        xc = big[yb == c].double()
        torch.testing.assert_close(xc.mean(0), means[c], atol=0.05, rtol=0)
        torch.testing.assert_close(torch.cov(xc.T), covs[c], atol=0.08, rtol=0.03)


def slow_alignment_loss(logits, tgt, task_sizes, tau):
    """The reference's _stage2_compact_classifier loss with ca_with_logit_norm, line by line."""
    per_task_norm = []
    prev, cur = 0, 0
    for size in task_sizes:
        cur += size
        per_task_norm.append(torch.norm(logits[:, prev:cur], p=2, dim=-1, keepdim=True) + 1e-7)
        prev += size
    norms = torch.cat(per_task_norm, dim=-1).mean(dim=-1, keepdim=True)
    return F.cross_entropy(torch.div(logits, norms) / tau, tgt)


def test_alignment_loss_is_the_references_logit_normalisation():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 10), torch.tensor([0, 3, 9, 4, 7, 2])
    got = alignment_loss(logits, y, [0, 4, 7, 10], 0.1)
    torch.testing.assert_close(got, slow_alignment_loss(logits, y, [4, 3, 3], 0.1))
    torch.testing.assert_close(alignment_loss(logits, y, [0, 4, 7, 10], None), F.cross_entropy(logits, y))
    # the scale of the logits does not matter once normalised
    torch.testing.assert_close(alignment_loss(3 * logits, y, [0, 4, 7, 10], 0.1), got)


# ------------------------------------------------------------------ a tiny run on digits
@pytest.fixture(scope="module")
def slca_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slca")
    cfg, _ = load_config(["data/digits-b0inc2"], TINY)
    trainer = Trainer(cfg, tmp, progress=False)
    start = {k: v.clone() for k, v in trainer.method.model.backbone.state_dict().items()}
    res = trainer.fit()
    return trainer, res, start, tmp


def test_lr_groups_slow_backbone_and_frozen_old_heads(slca_run):
    trainer, _, _, _ = slca_run
    m = trainer.method
    task = trainer.scenario[2]
    phase = m.phases(task)[0]
    m.setup_phase(phase, task)
    named = [(n, p) for n, p in m.model.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n, _ in named} == {"backbone", "head"}
    assert all(n.startswith("head.heads.2.") for n, _ in named if n.startswith("head."))
    opt = build_optimizer(named, phase.optim, m.lr_scales(phase, task))
    by_id = {id(p): n for n, p in named}
    for g in opt.param_groups:
        names = [by_id[id(p)] for p in g["params"]]
        want = 0.2 * 0.1 if names[0].startswith("backbone.") else 0.2
        assert all(n.startswith(names[0].split(".")[0]) for n in names) and g["lr"] == pytest.approx(want)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)


def test_run_learns_moves_the_backbone_slowly_and_stores_gaussians(slca_run):
    trainer, res, start, _ = slca_run
    m, sc = trainer.method, trainer.scenario
    assert res["tasks_done"] == 3 and res["class_il"]["last"] > 20  # 10 digits: chance is 10
    now = m.model.backbone.state_dict()
    assert any(not torch.equal(now[k], v) for k, v in start.items())  # it is a slow learner, not a frozen one
    assert m.means.shape == (10, 16) and m.covs.shape == (10, 16, 16)
    # the last task's statistics were taken on the final backbone (the alignment leaves it alone)
    task = sc[2]
    m.model.eval()
    with torch.no_grad():
        x = sc.train.images[task.train_idx].float() / 255
        x = (x - torch.tensor(sc.mean).view(1, -1, 1, 1)) / torch.tensor(sc.std).view(1, -1, 1, 1)
        feats = m.model.backbone(x)
    labels = sc.train_labels[task.train_idx]
    _, mu, cov = class_gaussians(feats, labels, 1e-4)
    torch.testing.assert_close(m.means[task.offset:], mu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.covs[task.offset:], cov.float(), rtol=1e-3, atol=1e-5)
    assert m.means[: task.offset].abs().sum() > 0  # older classes keep theirs


def test_alignment_changes_the_heads_and_the_next_task_recalls_them(slca_run):
    trainer, _, _, run_dir = slca_run
    fresh = Trainer(trainer.cfg, run_dir, progress=False)
    ckpts = {t: (fresh.method.model.head.state_dict(), fresh.method.head_before_ca)
             for t, _ in fresh.restore_task_checkpoints()}
    aligned0, backup0 = ckpts[0]
    for k, v in aligned0.items():  # no alignment after the first task
        torch.testing.assert_close(v, backup0[k])
    aligned1, backup1 = ckpts[1]
    assert any(not torch.equal(aligned1[k], backup1[k]) for k in aligned1)  # aligned for evaluation
    _, backup2 = ckpts[2]
    for k, v in backup1.items():  # task 2 trained from the un-aligned heads and kept the old ones frozen
        torch.testing.assert_close(backup2[k], v, rtol=0, atol=0, msg=k)


def test_resume_restores_statistics_and_scores(slca_run):
    trainer, _, _, run_dir = slca_run
    m, sc = trainer.method, trainer.scenario
    x = sc.test.images[:5].float() / 255
    m.model.eval()
    with torch.no_grad():
        want = m.logits(x)
    fresh = Trainer(trainer.cfg, run_dir, progress=False)
    dict(fresh.restore_task_checkpoints())
    r = fresh.method
    r.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(r.logits(x), want)
    torch.testing.assert_close(r.means, m.means)
    torch.testing.assert_close(r.covs, m.covs)


def test_sampling_means_scale_older_tasks_down(slca_run):
    trainer, _, _, _ = slca_run
    m, sc = trainer.method, trainer.scenario
    scaled = m.sampling_means(sc[2])
    for c in range(10):
        t = int(sc.task_of_label[c])
        torch.testing.assert_close(scaled[c], m.means[c] * (0.9 + (t + 1) / 3 * 0.1))


# ------------------------------------------------------------------ presets and the parameter count
def test_presets_load_and_options_are_checked():
    for preset in ("slca/cifar100-b0inc5-vitb16in21k", "slca/fashion-mnist-b0inc2-pretrained"):
        cfg, _ = load_config([preset])
        assert cfg.method.name == "slca" and cfg.method.backbone_lr_scale == 0.01
    cfg, _ = load_config(["slca/cifar100-b0inc5-vitb16in21k"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.train.milestones) == (0.01, 20, 64, [18])
    assert (cfg.method.ca_epochs, cfg.method.ca_samples, cfg.method.logit_norm) == (3, 256, 0.1)
    with pytest.raises(ConfigError, match="method.logit_norm"):
        load_config(["slca/fashion-mnist-b0inc2-pretrained"], ["method.logit_norm=0"])
    with pytest.raises(ConfigError, match="mixup_alpha"):
        load_config(["slca/fashion-mnist-b0inc2-pretrained"], ["data.augment.mixup_alpha=0.8"])


def test_parameter_count_trains_backbone_and_the_new_head():
    cfg, _ = load_config(["data/digits-b0inc2"], TINY)
    rows, _ = param_rows(cfg)
    D = 16
    vit = rows[0]["total"] - (4 * D + 4)
    for t, row in enumerate(rows):
        seen, new = [4, 7, 10][t], [4, 3, 3][t]
        assert row["total"] == vit + seen * D + seen
        assert row["trainable"] == vit + new * D + new  # old heads frozen while the task trains
    cfg, _ = load_config(["data/digits-b0inc2"], [*TINY, "method.backbone_lr_scale=0"])
    assert param_rows(cfg)[0][1]["trainable"] == 3 * D + 3  # a frozen backbone: the head alone


def test_params_cli_on_vit_b16(capsys):
    assert main(["params", "slca/cifar100-b0inc5-vitb16in21k", "model.pretrained=null"]) == 0
    last = capsys.readouterr().out.splitlines()[-1].split()
    assert last[0] == "20" and int(last[2].replace(",", "")) == 85_798_656 + 100 * 768 + 100
