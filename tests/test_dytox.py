"""DyTox / DyTox+: losses against direct transcriptions of the published code, growth, freezing, phases,
the teacher, parameter counts (docs/methods/dytox.md#parameter-counts) and an end-to-end run that resumes exactly."""
import json

import pytest
import torch
import torch.nn.functional as F

from vitcl import cli
from vitcl.data.build import build_scenario
from vitcl.errors import ConfigError
from vitcl.methods import METHODS, Batch
from vitcl.methods.dytox import classification, divergence_targets
from vitcl.methods.losses import distillation
from vitcl.runconfig import load_config

TINY = ["model.patch_size=2", "model.embed_dim=32", "model.num_heads=4", "model.depth=3", "model.local_up_to_layer=2",
        "model.drop_path=0.0", "memory.size=40"]


def make_method(overrides=(), preset="dytox/digits-b0inc2"):
    cfg, _ = load_config([preset], list(TINY) + list(overrides))
    scenario = build_scenario(cfg.data, shapes_only=True)
    torch.manual_seed(0)
    return METHODS.get(cfg.method.name)(cfg, scenario, torch.device("cpu")), scenario


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------- loss formulas
def test_distillation_is_the_published_kl_mean():
    torch.manual_seed(0)
    s, t = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    for tau in (1.0, 2.0):
        p_t = torch.softmax(t / tau, 1)
        kl_sum = (p_t * (torch.log(p_t) - torch.log_softmax(s / tau, 1))).sum()
        assert distillation(s, t, tau, "mean").item() == pytest.approx((kl_sum / 24 * tau**2).item(), rel=1e-6)
        assert distillation(s, t, tau, "batchmean").item() == pytest.approx((kl_sum / 6 * tau**2).item(), rel=1e-6)
    # the public call: F.kl_div(log_softmax(s), log_softmax(t), reduction='mean', log_target=True)
    ref = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="sum", log_target=True) / s.numel()
    assert distillation(s, t).item() == pytest.approx(ref.item(), rel=1e-6)


def test_bce_is_mean_over_batch_and_classes():
    torch.manual_seed(0)
    x, y = torch.randn(5, 7), torch.randint(0, 7, (5,))
    onehot = torch.eye(7)[y]
    p = torch.sigmoid(x)
    ref = -(onehot * torch.log(p) + (1 - onehot) * torch.log(1 - p)).mean()
    assert classification(x, onehot, "bce").item() == pytest.approx(ref.item(), rel=1e-5)
    soft = torch.softmax(torch.randn(5, 7), 1)
    assert classification(x, soft, "softmax").item() == pytest.approx(
        (-(soft * torch.log_softmax(x, 1)).sum(1).mean()).item(), rel=1e-5)


def test_divergence_targets():
    y = torch.tensor([0, 3, 4, 5, 6])  # 4 old classes, 3 new ones
    b = Batch(x=torch.zeros(5), y=y, task=torch.zeros(5), index=torch.arange(5))
    t = divergence_targets(b, n_old=4, n_new=3)
    assert t.argmax(1).tolist() == [0, 0, 1, 2, 3] and t.sum(1).tolist() == [1.0] * 5
    soft = torch.softmax(torch.randn(5, 7), 1)
    b.soft = soft
    t = divergence_targets(b, n_old=4, n_new=3)
    torch.testing.assert_close(t[:, 0], soft[:, :4].sum(1))
    torch.testing.assert_close(t[:, 1:], soft[:, 4:])


def _batch(scenario, task, n=12, soft=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    seen = task.end
    y = torch.randint(0, seen, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g)
    b = Batch(x=x, y=y, task=scenario.task_of_label[y], index=torch.arange(n))
    if soft:
        b.soft = torch.softmax(torch.randn(n, seen, generator=g), 1)
    return b


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("kd_samples", ["all", "memory"])
def test_total_loss_matches_transcription(soft, kd_samples):
    method, scenario = make_method([f"method.kd_samples={kd_samples}"])
    t0, t1, t2 = scenario[0], scenario[1], scenario[2]
    for t in (t0, t1, t2):
        method.begin_task(t)
    task = t2
    phase = method.phases(task)[0]
    method.setup_phase(phase, task)
    with torch.no_grad():  # move the fresh heads off their init so that every term matters
        for p in method.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    b = _batch(scenario, task, soft=soft)
    loss, logs = method.loss(b, phase, task)

    m = method.model
    logits = m(b.x)
    n_old, seen = task.offset, task.end
    target = b.soft if soft else torch.eye(seen)[b.y]
    bce = F.binary_cross_entropy_with_logits(logits, target)
    lam = n_old / seen
    old = method.teacher(b.x)
    rows = torch.ones(len(b.y), dtype=torch.bool) if kd_samples == "all" else b.task < task.index
    p_t = torch.softmax(old[rows], 1)
    kd = (p_t * (torch.log(p_t) - torch.log_softmax(logits[rows, :n_old], 1))).sum() / (rows.sum() * n_old)
    emb = m.forward_features(b.x)
    div_logits = m.head_div(emb[:, -1])
    assert div_logits.shape[1] == task.num_classes + 1
    if soft:
        div_t = torch.cat([b.soft[:, :n_old].sum(1, keepdim=True), b.soft[:, n_old:]], 1)
    else:
        div_t = torch.eye(task.num_classes + 1)[torch.where(b.y < n_old, 0, b.y - n_old + 1)]
    div = F.binary_cross_entropy_with_logits(div_logits, div_t)
    expected = (1 - lam) * bce + lam * kd + 0.1 * div
    assert rows.any()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(logs) == {"cls", "kd", "div"}


def test_finetune_loss_is_classification_only():
    method, scenario = make_method()
    method.begin_task(scenario[0])
    method.begin_task(scenario[1])
    task = scenario[1]
    ft = method.phases(task)[1]
    method.setup_phase(ft, task)
    b = _batch(scenario, task)
    loss, logs = method.loss(b, ft, task)
    ref = F.binary_cross_entropy_with_logits(method.model(b.x), torch.eye(task.end)[b.y])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6) and set(logs) == {"cls"}


# --------------------------------------------------------------------------------------------- growth, freezing
def test_growth_teacher_and_freezing():
    method, scenario = make_method(["method.frozen_encoder_mode=eval"])
    m = method.model
    method.begin_task(scenario[0])
    assert len(m.task_tokens) == 1 and len(m.heads) == 1 and m.head_div is None and method.teacher is None
    x = torch.randn(4, 1, 8, 8)
    m.eval()
    before = m(x).detach()
    method.begin_task(scenario[1])
    assert len(m.task_tokens) == 2 and len(m.heads) == 2 and m.head_div.fc.out_features == 3
    assert 0 < m.task_tokens[1].abs().max() < 0.2  # trunc-normal(0.02): small, random
    teacher = method.teacher
    assert teacher.head_div is None and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher(x), before)  # the model as it was before the expansion
    m.eval()
    torch.testing.assert_close(m(x)[:, :2], before)  # old logits unchanged by the expansion

    train, ft = method.phases(scenario[1])
    method.setup_phase(train, scenario[1])
    assert not m.task_tokens[0].requires_grad and m.task_tokens[1].requires_grad
    assert not any(p.requires_grad for p in m.heads[0].parameters())
    assert all(p.requires_grad for p in m.heads[1].parameters())
    assert all(p.requires_grad for p in m.encoder.parameters()) and m.training
    method.setup_phase(ft, scenario[1])
    assert not any(p.requires_grad for p in m.encoder.parameters())
    assert all(p.requires_grad for p in m.decoder.parameters())
    assert all(t.requires_grad for t in m.task_tokens)
    assert all(p.requires_grad for p in m.heads.parameters())
    assert not m.encoder.training and m.decoder.training  # frozen_encoder_mode=eval


def test_frozen_encoder_stays_in_train_mode_by_default():
    method, scenario = make_method()
    method.begin_task(scenario[0])
    method.begin_task(scenario[1])
    method.setup_phase(method.phases(scenario[1])[1], scenario[1])
    assert method.model.encoder.training  # the published behaviour: drop-path stays on in the frozen SABs


def test_phases():
    method, scenario = make_method(["train.batch_size=64", "train.lr_scale_batch=512",
                                    "method.repeated_augmentation=3"])
    (p0,) = method.phases(scenario[0])
    assert (p0.name, p0.data, p0.repeats, p0.repeat_mode) == ("train", "task+memory", 3, "deit")
    assert p0.lr == pytest.approx(method.cfg.train.lr * 64 / 512)
    train, ft = method.phases(scenario[1])
    assert (ft.name, ft.data, ft.schedule, ft.epochs, ft.warmup_epochs) == ("finetune", "memory", "constant", 10, 0)
    assert ft.lr == pytest.approx(method.opts.finetune_lr * 64 / 512)
    assert ft.shuffle and not ft.drop_last and ft.repeats == 1
    method, scenario = make_method(["method.finetune_order=stored_drop_last"])
    ft = method.phases(scenario[1])[1]
    assert not ft.shuffle and ft.drop_last


def test_dytox_needs_convit_and_dytox_plus_needs_mixup():
    with pytest.raises(ConfigError, match="model.name"):
        cfg, _ = load_config(["dytox/digits-b0inc2"], ["model.name=vit"])
        METHODS.get("dytox")(cfg, build_scenario(cfg.data, shapes_only=True), torch.device("cpu"))
    with pytest.raises(ConfigError, match="mixup_alpha"):
        make_method(["method.name=dytox-plus"])
    method, _ = make_method(["method.name=dytox-plus", "data.augment.mixup_alpha=0.8"])
    assert method.name == "dytox-plus"


def test_parameter_count_excludes_divergence_head():
    method, scenario = make_method()
    for t in scenario:
        method.begin_task(t)
    m, C = method.model, 32
    shared = n_params(m.encoder) + n_params(m.decoder)
    per_task = sum(C + 2 * C + C * t.num_classes + t.num_classes for t in scenario)
    assert method.count_parameters().total == shared + per_task
    assert n_params(m) == shared + per_task + n_params(m.head_div)


@pytest.mark.parametrize("preset,total", [("dytox/cifar100-b0inc10", 10_733_584), ("dytox/cifar100-b0inc5", 10_745_104),
                                          ("dytox/cifar100-b0inc2", 10_779_664), ("dytox/cifar100-joint", 10_723_216)])
def test_vitcl_params_matches_the_paper(preset, total, capsys):
    assert cli.main(["params", preset, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[-1]["total"] == total
    assert int(total / 1e4) / 100 == {10_733_584: 10.73, 10_745_104: 10.74, 10_779_664: 10.77,
                                      10_723_216: 10.72}[total]


def test_presets_load():
    for name in ("dytox/cifar100-b0inc10", "dytox-plus/cifar100-b0inc2", "dytox/imagenet100-b0inc10",
                 "dytox/imagenet1000-b0inc100", "dytox-plus/cifar100-joint"):
        cfg, _ = load_config([name])
        assert cfg.model.name == "convit" and cfg.method.name.startswith("dytox")
    cfg, _ = load_config(["dytox-plus/cifar100-b0inc10"])
    assert cfg.data.augment.mixup_alpha == 0.8 and cfg.data.augment.label_smoothing == 0.1
    assert cfg.train.lr * cfg.train.batch_size / cfg.train.lr_scale_batch == pytest.approx(2.5e-4)
    cfg, _ = load_config(["dytox/imagenet100-b0inc10"])
    assert cfg.model.patch_size == 16 and cfg.data.image_size == 224


# --------------------------------------------------------------------------------------------- end to end
def test_run_and_exact_resume(tmp_path, monkeypatch):
    from vitcl.engine.trainer import Trainer

    args = ["dytox/digits-b0inc2", *TINY, "data.increment=5", "data.train_per_class=24", "data.test_per_class=10",
            "train.epochs=2", "train.batch_size=32", "method.finetune_epochs=1", "run.progress=false",
            "method.repeated_augmentation=2", f"run.out_dir={tmp_path}"]
    assert cli.main(["run", "-q", *args, "run.name=full"]) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    assert full["tasks_done"] == 2 and full["class_il"] and full["task_il"]
    assert full["params"]["final"] == full["params"]["per_task"][0] + 32 + 2 * 32 + 5 * 32 + 5

    original = Trainer.save_checkpoint

    def save_then_stop(self, name="last.pt", optimizer=None):
        original(self, name, optimizer)
        if (self.state.task, self.state.phase, self.state.epoch) == (1, 0, 1):  # mid-task: the teacher is live
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)
    assert cli.main(["run", "-q", *args, "run.name=cut"]) == 130
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    assert cli.main(["resume", "-q", str(tmp_path / "cut")]) == 0
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert resumed["class_il"]["acc_matrix"] == full["class_il"]["acc_matrix"]
    assert resumed["task_il"]["acc_matrix"] == full["task_il"]["acc_matrix"]


def test_repeated_augmentation_orders():
    from vitcl.data.stream import epoch_order

    deit = epoch_order(100, 7, True, 3, "deit")
    assert len(deit) == 100  # the epoch keeps its length: ~n/3 images, each 3 times in a row
    assert len(deit.unique()) == 34 and torch.equal(deit[:99].view(33, 3), deit[:99].view(33, 3)[:, :1].expand(33, 3))
    assert not torch.equal(deit, epoch_order(100, 8, True, 3, "deit"))  # a fresh permutation every epoch
    extend = epoch_order(100, 7, True, 3, "extend")
    assert len(extend) == 300 and torch.equal(torch.bincount(extend), torch.full((100,), 3))
