"""LPA's baseline (single class token DyTox) and w/LPA: network, freezing, the memory-only distillation (also while
finetuning) against a direct transcription, presets, and a tiny end-to-end run with the locality analyses."""
import json

import pytest
import torch
import torch.nn.functional as F

from vitcl import cli
from vitcl.data.build import build_scenario
from vitcl.errors import ConfigError
from vitcl.methods import METHODS, Batch
from vitcl.models.lpsa import LPSA
from vitcl.runconfig import load_config, preset_names

TINY = ["model.embed_dim=32", "model.num_heads=4", "model.depth=3", "model.local_up_to_layer=2", "memory.size=40"]


def make_method(overrides=(), preset="lpa-baseline/digits-b0inc2"):
    cfg, _ = load_config([preset], list(TINY) + list(overrides))
    scenario = build_scenario(cfg.data, shapes_only=True)
    torch.manual_seed(0)
    return METHODS.get(cfg.method.name)(cfg, scenario, torch.device("cpu")), scenario


def batch_of(scenario, task, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, task.end, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return Batch(x=x, y=y, task=scenario.task_of_label[y], index=torch.arange(n))


def test_single_token_and_per_task_heads():
    m, sc = make_method()
    for t in range(3):
        m.begin_task(sc[t])
    net = m.model
    assert len(net.task_tokens) == 1 and len(net.heads) == 3 and net.head_div is None
    x = torch.randn(4, 1, 8, 8)
    emb = net.forward_features(x)
    assert emb.shape == (4, 1, 32)
    expected = torch.cat([h(emb[:, 0]) for h in net.heads], 1)
    torch.testing.assert_close(m.logits(x), expected)
    # the count grows by the classifiers only
    counts = []
    m2, _ = make_method()
    for t in range(3):
        m2.begin_task(sc[t])
        counts.append(m2.count_parameters().total)
    head = 2 * 32 + 32 * 2 + 2  # LayerNorm + Linear over 2 classes
    assert counts[1] - counts[0] == head and counts[2] - counts[1] == head


def test_freezing_per_phase():
    m, sc = make_method()
    m.begin_task(sc[0])
    m.begin_task(sc[1])
    train, ft = m.phases(sc[1])
    assert (train.name, ft.name, ft.schedule, ft.data) == ("train", "finetune", "constant", "memory")
    m.setup_phase(train, sc[1])
    net = m.model
    assert net.task_tokens[0].requires_grad and all(p.requires_grad for p in net.encoder.parameters())
    assert not any(p.requires_grad for p in net.heads[0].parameters())
    assert all(p.requires_grad for p in net.heads[1].parameters())
    m.setup_phase(ft, sc[1])  # LPA's freeze_ft: [sab, tab]
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert not any(p.requires_grad for p in net.decoder.parameters())
    assert net.task_tokens[0].requires_grad and all(p.requires_grad for p in net.heads.parameters())
    m2, _ = make_method(["method.finetune_frozen=encoder"])  # DyTox's freeze_ft: [sab]
    m2.begin_task(sc[0])
    m2.begin_task(sc[1])
    m2.setup_phase(m2.phases(sc[1])[1], sc[1])
    assert all(p.requires_grad for p in m2.model.decoder.parameters())


def reference_loss(m, batch, task):
    """LPA's engine: BCE on one-hot targets; KD (reduction 'mean') on the old-task samples only, weighted by
    lambda = n_old / n_seen; a batch without old samples gets the BCE alone."""
    logits = m.model(batch.x)
    bce = F.binary_cross_entropy_with_logits(logits, F.one_hot(batch.y, logits.shape[1]).float())
    mask = batch.task < task.index
    if not mask.any():
        return bce
    n_old = task.offset
    with torch.no_grad():
        teacher = m.teacher(batch.x)[mask]
    s = logits[mask][:, :n_old]
    p_t = torch.softmax(teacher, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s, 1))).sum() / s.numel()
    lam = n_old / logits.shape[1]
    return (1 - lam) * bce + lam * kl


@pytest.mark.parametrize("phase_index", [0, 1])
def test_memory_only_distillation_in_training_and_finetuning(phase_index):
    m, sc = make_method()
    m.begin_task(sc[0])
    with torch.no_grad():  # make the teacher differ from the student
        for p in m.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.begin_task(sc[1])
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    phase = m.phases(sc[1])[phase_index]
    m.setup_phase(phase, sc[1])
    m.model.eval()  # no drop-path: compare two forwards
    batch = batch_of(sc, sc[1])
    assert (batch.task == 0).any() and (batch.task == 1).any()
    loss, logs = m.loss(batch, phase, sc[1])
    assert "kd" in logs and "div" not in logs
    torch.testing.assert_close(loss, reference_loss(m, batch, sc[1]), rtol=1e-5, atol=1e-6)
    new_only = batch_of(sc, sc[1], seed=1)
    keep = new_only.task == 1
    new_only = Batch(x=new_only.x[keep], y=new_only.y[keep], task=new_only.task[keep], index=new_only.index[keep])
    loss, logs = m.loss(new_only, phase, sc[1])
    assert logs["kd"].item() == 0.0  # no memory sample: nothing distilled (masked, no host read)
    torch.testing.assert_close(loss, reference_loss(m, new_only, sc[1]))


def test_divergence_weight_is_rejected():
    with pytest.raises(ConfigError, match="method.divergence_weight"):
        load_config(["lpa-baseline/digits-b0inc2"], ["method.divergence_weight=0.1"])


def test_presets():
    names = preset_names()
    for family in ("lpa-baseline", "lpa", "dytox-plus-lpa"):
        for s in ("cifar100-b10inc10", "cifar100-b5inc5", "cifar100-b50inc10", "cifar100-b50inc5",
                  "imagenet100-b10inc10", "imagenet100-b50inc10", "imagenet100-b50inc5"):
            assert f"{family}/{s}" in names
    cfg, _ = load_config(["lpa/cifar100-b50inc5"])
    t, o = cfg.train, cfg.method
    assert cfg.model.sab == "lpsa" and cfg.model.lpsa_lambda_std == 0.02 and cfg.data.class_order == "cifar100-order1"
    assert (t.first_task_epochs, t.epochs, t.batch_size, t.first_task_lr, t.lr) == (500, 600, 256, 2.5e-4, 4e-4)
    assert t.lr_scale_batch is None and cfg.memory.size == 2000 and cfg.data.augment.mixup_alpha == 0.8
    assert (o.name, o.kd_samples, o.finetune_distillation, o.finetune_lr, o.finetune_epochs) == \
        ("lpa-baseline", "memory", True, 5e-5, 20)
    assert (cfg.data.initial_increment, cfg.data.increment) == (50, 5)
    base, _ = load_config(["lpa-baseline/imagenet100-b10inc10"])
    assert base.model.sab == "gpsa" and base.model.patch_size == 16 and base.data.class_order == "imagenet100-order1"
    dp, _ = load_config(["dytox-plus-lpa/cifar100-b10inc10"])
    assert dp.method.name == "dytox-plus" and dp.model.sab == "lpsa" and dp.method.divergence_weight == 0.1
    assert dp.method.kd_samples == "memory" and dp.method.finetune_distillation


def test_lpa_run_records_locality(tmp_path):
    common = [f"run.out_dir={tmp_path}", "train.epochs=1", "train.max_batches=2", "method.finetune_epochs=1",
              "data.train_per_class=20", "data.test_per_class=10", "data.increment=5", "memory.size=20",
              "eval.analysis_samples=30", "-q"]
    assert cli.main(["run", "lpa/digits-b0inc2", "run.name=lpa", *common]) == 0
    run = tmp_path / "lpa"
    res = json.loads((run / "results.json").read_text())
    assert res["method"] == "lpa-baseline" and res["tasks_done"] == 2
    loc = json.loads((run / "analysis" / "locality.json").read_text())
    assert loc["layers"] == ["encoder.blocks.0.attn", "encoder.blocks.1.attn"] and len(loc["nonlocality"]) == 2
    ckpt = torch.load(run / "checkpoints" / "task_1.pt", weights_only=False)
    assert any(k.endswith("pos_proj.weight") and v.shape == (4, 4) for k, v in ckpt["method"]["model"].items())
    cfg, _ = load_config(["lpa/digits-b0inc2"], list(TINY))
    m = METHODS.get(cfg.method.name)(cfg, build_scenario(cfg.data, shapes_only=True), torch.device("cpu"))
    assert all(isinstance(b.attn, LPSA) for b in m.model.encoder.blocks)


def test_dytox_finetune_distillation_option():
    """DyTox under LPA's recipe (dytox-plus-lpa presets): KD also in finetuning, never the divergence loss."""
    for on in (False, True):
        m, sc = make_method(["model.patch_size=2", "method.kd_samples=memory",
                             f"method.finetune_distillation={str(on).lower()}", "method.finetune_repeated_augmentation=3"],
                            preset="dytox/digits-b0inc2")
        m.begin_task(sc[0])
        m.begin_task(sc[1])
        train, ft = m.phases(sc[1])
        assert ft.repeats == 3 and ft.repeat_mode == train.repeat_mode
        m.setup_phase(train, sc[1])
        _, logs = m.loss(batch_of(sc, sc[1]), train, sc[1])
        assert {"kd", "div"} <= set(logs)
        m.setup_phase(ft, sc[1])
        _, logs = m.loss(batch_of(sc, sc[1]), ft, sc[1])
        assert ("kd" in logs) == on and "div" not in logs
