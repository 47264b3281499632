"""The task-IL methods on tiny backbones: each task keeps its own parameters (no forgetting by construction where
the method promises it), the right parameters train, counts, resume, and a full run through the engine."""
import json

import pytest
import torch

from vitcl.cli import main
from vitcl.data.build import build_scenario
from vitcl.methods import METHODS, Batch
from vitcl.runconfig import load_config

TINY_RESNET = ["model.name=resnet18", "model.width=4", "model.stem=cifar"]
pytestmark = pytest.mark.usefixtures("without_onednn")  # conftest.py: oneDNN aborts on these width-4 ResNets
TINY_VIT = ["model.name=vit", "model.patch_size=4", "model.embed_dim=16", "model.depth=2", "model.num_heads=2"]
BASE = ["finetune/digits-b0inc2", "data.setting=task-il", "data.class_order=null", "data.increment=[4,3,3]",
        "data.augment.crop_padding=0"]


def make(method: str, *extra: str, model=TINY_RESNET):
    cfg, _ = load_config([BASE[0]], [*BASE[1:], *model, f"method.name={method}", *extra])
    scenario = build_scenario(cfg.data)
    torch.manual_seed(0)
    return METHODS.get(method)(cfg, scenario, torch.device("cpu"))


def train_task(m, t: int, steps: int = 3):
    task = m.scenario[t]
    m.begin_task(task)
    phase = m.phases(task)[0]
    m.setup_phase(phase, task)
    params = [p for p in m.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    idx = task.train_idx[:32]
    x = m.scenario.train.images[idx].float() / 255
    y = m.scenario.train_labels[idx]
    for _ in range(steps):
        loss, _ = m.loss(Batch(x=x, y=y, task=torch.full_like(y, t), index=idx), phase, task)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.end_task(task)
    return params


def task_logits(m, t: int) -> torch.Tensor:
    m.model.eval()
    with torch.no_grad():
        x = m.scenario.test.images[m.scenario[t].test_idx[:16]].float() / 255
        out = m.logits(x, task=t)
    m.model.train()
    return out


@pytest.mark.parametrize("method,extra,model", [
    ("piggyback", [], TINY_RESNET),
    ("rkr", [], TINY_RESNET),
    ("rkr", [], TINY_VIT),
    ("mask-rkr", [], TINY_RESNET),
    ("mask-rkr", ["method.rg=mask-product", "method.sfg_mode=real"], TINY_VIT),
    ("mask-rkr", ["method.rg=mask-lm"], TINY_RESNET),
    ("mask-rkr", ["method.sfg_mode=real", "method.sfg_spare=true"], TINY_VIT),
    ("multi-head", [], TINY_RESNET),
    ("multi-head", ["method.backbone=first-task"], TINY_RESNET),
    ("single", [], TINY_RESNET),
])
def test_old_tasks_keep_their_outputs(method, extra, model):
    m = make(method, *extra, model=model)
    train_task(m, 0)
    before = task_logits(m, 0)
    assert before.shape == (16, 4)
    train_task(m, 1)
    torch.testing.assert_close(task_logits(m, 0), before, rtol=0, atol=0)
    assert task_logits(m, 1).shape == (16, 3)


@pytest.mark.parametrize("method,extra", [("rkr", ["method.bn=shared"]), ("multi-head", ["method.backbone=every-task"])])
def test_shared_statistics_or_backbone_drift(method, extra):
    m = make(method, *extra)
    train_task(m, 0)
    before = task_logits(m, 0)
    train_task(m, 1)
    assert not torch.equal(task_logits(m, 0), before)


def test_what_each_task_trains():
    m = make("mask-rkr")
    train_task(m, 0)
    names0 = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert names0 and all(".slots.0." in n and n.rsplit(".", 1)[1] in ("lm", "rm", "f") or n.startswith("head.heads.0.")
                          for n in names0)
    task = m.scenario[1]
    m.begin_task(task)
    m.setup_phase(m.phases(task)[0], task)
    names1 = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert all((".slots.1." in n and n.endswith("_score")) or n.startswith("head.heads.1.") for n in names1)
    p = make("piggyback")
    train_task(p, 0)
    assert all(n.endswith("w_score") or n.startswith("head.") for n, q in p.model.named_parameters()
               if q.requires_grad)


def test_counts_masks_at_one_32nd():
    m = make("piggyback")
    backbone = sum(q.numel() for q in m.initial.parameters()) if hasattr(m, "initial") else None
    train_task(m, 0)
    train_task(m, 1)
    convs = sum(q.numel() for n, q in m.model.backbone.named_parameters() if n.endswith(".weight") and q.ndim == 4)
    plain = sum(q.numel() for n, q in m.model.backbone.named_parameters() if not n.endswith("_score"))
    heads = sum(q.numel() for q in m.model.head.parameters())
    c = m.count_parameters()
    assert backbone is None
    assert c.total == plain + heads + 2 * convs / 32
    assert c.trainable == convs / 32 + sum(q.numel() for q in m.model.head.heads[1].parameters())
    assert m.reference_count() == plain + m.model.backbone.num_features * 4 + 4


def test_resume_rebuilds_every_task():
    m = make("mask-rkr", model=TINY_VIT)
    train_task(m, 0)
    train_task(m, 1)
    state = m.state_dict()
    fresh = make("mask-rkr", model=TINY_VIT)
    for t in range(2):
        fresh.begin_task(fresh.scenario[t])
    fresh.load_state_dict(state)
    for t in range(2):
        torch.testing.assert_close(task_logits(fresh, t), task_logits(m, t))


def test_layer_patterns_from_config():
    m = make("rkr", "method.layers=[blocks.*.mlp.fc1, {pattern: blocks.*.attn.qkv, split: 3, sfg: false}]",
             model=TINY_VIT)
    wrapped = [n for n, mod in m.model.backbone.named_modules() if type(mod).__name__ == "TaskLayer"]
    assert wrapped == ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"]
    from vitcl.errors import ConfigError

    with pytest.raises(ConfigError, match="method.layers"):
        make("rkr", "method.layers=[blocks.*.nothing]", model=TINY_VIT)


def test_spare_scale_factors_need_real_ones():
    from vitcl.errors import ConfigError

    with pytest.raises(ConfigError, match="method.sfg_spare: needs method.sfg_mode=real"):
        load_config([BASE[0]], [*BASE[1:], *TINY_VIT, "method.name=mask-rkr", "method.sfg_spare=true"])


def test_task_il_only():
    from vitcl.errors import ConfigError

    with pytest.raises(ConfigError, match="task-il"):  # when the config is built, before any data
        load_config([BASE[0]], ["method.name=rkr", *TINY_RESNET])


def test_run_records_both_protocols(tmp_path, capsys):
    rc = main(["run", *BASE, *TINY_VIT, "method.name=mask-rkr", "train.epochs=2", "train.eval_every=1",
               "train.batch_size=32", "train.max_batches=3", f"run.out_dir={tmp_path}", "run.name=r", "-q"])
    assert rc == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    til = res["task_il"]
    assert res["class_il"] is None and len(til["acc_matrix"]) == 3
    diag = [til["acc_matrix"][j][j] for j in range(3)]
    assert all(b >= d for b, d in zip(til["best_during_training"], diag))
    assert til["forgetting"] == pytest.approx(0.0)  # masks and base factors of old tasks never change
    assert "best while training" in capsys.readouterr().out
    periodic = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "periodic" for r in periodic) == 3


def test_input_size_upsamples_batches_on_the_device():
    m = make("multi-head", "method.input_size=16", model=TINY_VIT)
    assert m.model.backbone.pos_embed.shape[1] == (16 // 4) ** 2  # built for 16 px (mean pooling: no class token)
    train_task(m, 0, steps=1)
    assert task_logits(m, 0).shape == (16, 4)  # fed 8 px digits


def test_reevaluating_saved_tasks_gives_the_same_matrix(tmp_path):
    rc = main(["run", *BASE, *TINY_RESNET, "method.name=piggyback", "train.epochs=1", "train.batch_size=32",
               "train.max_batches=2", f"run.out_dir={tmp_path}", "run.name=r", "-q"])
    assert rc == 0
    assert main(["eval", str(tmp_path / "r")]) == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    again = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert again["task_il"]["acc_matrix"] == res["task_il"]["acc_matrix"]
