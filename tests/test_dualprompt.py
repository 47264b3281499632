"""DualPrompt: the prefixes reach each block's attention as keys and values (a slow transcription of the attention),
the key matching at inference, the key's pull during training; that only the G-prompt, the current E-prompt, key
and head train; the parameter count, a tiny run, resume, the presets."""
import math

import pytest
import torch

from vitcl.cli import param_rows
from vitcl.data.build import build_scenario
from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.methods import METHODS
from vitcl.runconfig import load_config

RUN = ["model.embed_dim=16", "model.depth=3", "model.num_heads=2", "model.pool=token", "model.patch_size=4",
       "data.train_per_class=12", "data.test_per_class=6", "data.increment=[5,5]",
       "train.epochs=2", "train.batch_size=8", "train.warmup_epochs=0", "train.optimizer=adam", "train.lr=0.01",
       "train.weight_decay=0.0", "train.schedule=constant", "eval.batch_size=64", "run.threads=1",
       "method.name=dualprompt", "method.g_length=2", "method.g_layers=[0]", "method.e_length=3",
       "method.e_layers=[1,2]"]


def dp_cfg(*overrides):
    return load_config(["finetune/digits-b0inc2"], [*RUN, *overrides])[0]


def dp_method(tasks=1, *overrides):
    cfg = dp_cfg(*overrides)
    scenario = build_scenario(cfg.data)
    m = METHODS.get("dualprompt")(cfg, scenario, torch.device("cpu"))
    for t in range(tasks):
        m.begin_task(scenario[t])
    return m


# ------------------------------------------------------------------ transcriptions
def slow_attention(attn, x, pk, pv):
    """softmax(q [pk; k]^T / sqrt(d)) [pv; v] head by head, for one image (N, D) with a prefix (P, D)."""
    N, D = x.shape
    H = attn.num_heads
    d = D // H
    qkv = x @ attn.qkv.weight.t() + attn.qkv.bias
    q, k, v = qkv[:, :D], qkv[:, D:2 * D], qkv[:, 2 * D:]
    k, v = torch.cat([pk, k]), torch.cat([pv, v])
    heads = []
    for h in range(H):
        s = slice(h * d, (h + 1) * d)
        a = torch.softmax(q[:, s] @ k[:, s].t() / math.sqrt(d), dim=1)
        heads.append(a @ v[:, s])
    return torch.cat(heads, 1) @ attn.proj.weight.t() + attn.proj.bias


def slow_features(model, x, e):
    """The class token after the blocks with the G-prompt at g_layers and E-prompt e at e_layers, image by image."""
    b = model.backbone
    outs = []
    for i in range(x.shape[0]):
        t = b.embed_tokens(x[i:i + 1])[0]
        for layer, block in enumerate(b.blocks):
            if layer in model.g_layers:
                p = model.g_prompt[model.g_layers.index(layer)]
            elif layer in model.e_layers:
                p = model.e_prompts[e[i]][model.e_layers.index(layer)]
            else:
                p = None
            a = block.norm1(t)
            att = block.attn(a[None])[0] if p is None else slow_attention(block.attn, a, p[0], p[1])
            t = t + att
            t = t + block.mlp(block.norm2(t))
        outs.append(b.norm(t)[0])
    return torch.stack(outs)


def test_prefix_halves_are_the_keys_and_values_of_their_blocks():
    m = dp_method(2)
    model = m.model.eval()
    with torch.no_grad():
        model.e_prompts[1].uniform_(-1, 1)  # unlike the copy of E-prompt 0 it starts as
    x = torch.randn(4, 1, 8, 8)
    e = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        fast = model.features(x, e)
        slow = slow_features(model, x, e.tolist())
        plain = model.backbone(x)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert not torch.allclose(fast, plain, atol=1e-3)  # the prefixes change the output
    # swapping a prompt's key and value halves changes the output: the split is not symmetric
    with torch.no_grad():
        model.g_prompt.copy_(model.g_prompt.flip(1))
        assert not torch.allclose(model.features(x, e), fast, atol=1e-4)


def test_inference_takes_the_e_prompt_whose_key_is_nearest():
    m = dp_method(2)
    model = m.model.eval()
    x = torch.randn(6, 1, 8, 8)
    q = model.backbone(x)
    keys = torch.stack([model.e_keys[0].detach(), q[:3].mean(0)])  # key 1 near the first three queries
    with torch.no_grad():
        model.e_keys[1].copy_(keys[1])
    _, _, idx = model(x)
    for b in range(6):
        cos = [float(torch.dot(q[b], k) / (q[b].norm() * k.norm())) for k in keys]
        assert idx[b].item() == max(range(2), key=lambda j: cos[j])
    _, _, vote = model(x, batchwise=True)
    assert len(set(vote.tolist())) == 1
    _, _, forced = model(x, task=0)  # training: the task's own E-prompt
    assert forced.tolist() == [0] * 6


def test_loss_pulls_the_current_key_by_one_minus_cosine():
    m = dp_method(2, "method.pull_coeff=0.5", "method.train_mask=false")
    task = m.scenario[1]
    m.setup_phase(m.phases(task)[0], task)
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([5, 6, 7, 8, 9])
    from vitcl.methods.base import Batch
    loss, logs = m.loss(Batch(x=x, y=y, task=torch.ones(5, dtype=torch.long), index=torch.arange(5)), None, task)
    q, k = m.model.backbone(x), m.model.e_keys[1].detach()
    pull = sum(1 - float(torch.dot(q[b], k) / (q[b].norm() * k.norm())) for b in range(5)) / 5
    assert logs["surrogate"].item() == pytest.approx(pull, rel=1e-5)
    logits = m.model.head(m.model.features(x, torch.ones(5, dtype=torch.long)))
    ce = torch.nn.functional.cross_entropy(logits, y).item()
    assert loss.item() == pytest.approx(ce + 0.5 * pull, rel=1e-5)
    loss.backward()
    assert m.model.e_keys[1].grad is not None and m.model.e_keys[0].grad is None


def test_a_new_e_prompt_starts_as_a_copy_of_the_last():
    m = dp_method(2)
    assert torch.equal(m.model.e_prompts[0], m.model.e_prompts[1])
    assert not torch.equal(m.model.e_keys[0], m.model.e_keys[1])
    fresh = dp_method(2, "method.init_from_previous=false")
    assert not torch.equal(fresh.model.e_prompts[0], fresh.model.e_prompts[1])


# ------------------------------------------------------------------ training
def test_only_the_g_prompt_the_current_e_prompt_key_and_head_train(tmp_path):
    trainer = Trainer(dp_cfg(), tmp_path, progress=False)
    m = trainer.method
    backbone = {k: v.clone() for k, v in m.model.backbone.state_dict().items()}
    snaps = []
    original = m.end_task

    def snapshot(t):
        snaps.append({k: v.detach().clone() for k, v in m.model.state_dict().items() if not k.startswith("backbone")})
        original(t)

    m.end_task = snapshot
    g0 = m.model.g_prompt.detach().clone()
    res = trainer.fit()
    assert res["tasks_done"] == 2
    for k, v in m.model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    a, b = snaps
    for k in ("e_prompts.0", "e_keys.0", "head.heads.0.fc.weight", "head.heads.0.fc.bias"):
        assert torch.equal(a[k], b[k]), k  # task 0's E-prompt, key and head do not move in task 1
    assert not torch.equal(a["g_prompt"], g0) and not torch.equal(b["g_prompt"], a["g_prompt"])
    assert not torch.equal(b["e_prompts.1"], a["e_prompts.0"])  # started as its copy, then trained
    assert 0 <= res["class_il"]["last"] <= 100


def test_resume_restores_the_grown_prompts(tmp_path):
    trainer = Trainer(dp_cfg(), tmp_path, progress=False)
    trainer.fit()
    state = trainer.method.state_dict()
    fresh = dp_method(0)
    for t in fresh.scenario:
        fresh.begin_task(t)
    fresh.load_state_dict(state)
    for k, v in trainer.method.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v), k


def test_parameter_count_grows_by_one_e_prompt_key_and_head_per_task():
    cfg = dp_cfg()
    rows, _ = param_rows(cfg)
    D = 16
    g, e, key, head = 1 * 2 * 2 * D, 2 * 2 * 3 * D, D, D * 5 + 5
    assert rows[1]["total"] - rows[0]["total"] == e + key + head
    assert [r["trainable"] for r in rows] == [g + e + key + head] * 2


def test_check_rejects_layers_the_vit_lacks_and_overlaps():
    with pytest.raises(ConfigError, match="e_layers"):
        METHODS.get("dualprompt").check(dp_cfg("method.e_layers=[1,3]"))
    with pytest.raises(ConfigError, match="e_layers"):
        dp_cfg("method.e_layers=[0,1]")
    with pytest.raises(ConfigError, match="model.pool"):
        METHODS.get("dualprompt").check(dp_cfg("model.pool=mean"))


@pytest.mark.parametrize("preset", ["dualprompt/cifar100-b0inc5-vitb16in21k",
                                    "dualprompt/fashion-mnist-b0inc2-pretrained"])
def test_presets_load_and_pass_the_check(preset):
    cfg = load_config([preset], ["model.pretrained=null"])[0]
    METHODS.get("dualprompt").check(cfg)
    assert cfg.method.name == "dualprompt"


def test_vit_b16_preset_counts():
    cfg = load_config(["dualprompt/cifar100-b0inc5-vitb16in21k"], ["model.pretrained=null"])[0]
    rows, _ = param_rows(cfg)
    g, e, key, head = 2 * 2 * 5 * 768, 3 * 2 * 5 * 768, 768, 768 * 5 + 5
    assert rows[0]["total"] == 85_798_656 + g + e + key + head
    assert rows[0]["trainable"] == g + e + key + head
    assert rows[-1]["total"] - rows[0]["total"] == 19 * (e + key + head)
