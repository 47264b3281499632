"""APER (aper) and models/peft.py: VPT and SSF against direct transcriptions of LAMDA-PILOT's forward passes, the
prototypes and cosine scores of [pretrained, adapted] embeddings, the first session's loss, frozen parts, resume,
parameter counts and presets."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitcl.cli import main, param_rows
from vitcl.data.build import build_scenario
from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.methods import METHODS
from vitcl.models.peft import SSF, VisualPrompts, add_ssf, set_ssf_active, ssf_parameters, vpt_features
from vitcl.models.vit import VisionTransformer
from vitcl.runconfig import load_config

TINY = ["method.name=aper", "model.name=vit", "model.patch_size=4", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "model.pool=token", "model.pretrained=null", "method.bottleneck=4",
        "method.prompt_length=2", "data.train_per_class=20", "data.test_per_class=8", "data.increment=[4,3,3]",
        "data.augment.crop_padding=0", "train.optimizer=sgd", "train.lr=0.05", "train.weight_decay=0.0005",
        "train.min_lr=0", "train.epochs=2", "train.batch_size=16", "train.warmup_epochs=0", "eval.batch_size=64",
        "memory.size=0"]


def _vit(pool="token", depth=2):
    torch.manual_seed(0)
    return VisionTransformer(8, 3, patch_size=4, embed_dim=16, depth=depth, num_heads=2, pool=pool).eval()


# ------------------------------------------------------------------ VPT
def reference_vpt_deep(vit, x, prompts):
    """LAMDA-PILOT's vit_adapter.py with vpt_on: block i's prompts go in *front* of the tokens and its first P
    outputs are dropped; the class token is read after the final norm."""
    t = vit.embed_tokens(x)
    for i, block in enumerate(vit.blocks):
        p = prompts[i][None].expand(x.shape[0], -1, -1)
        t = block(torch.cat([p, t], dim=1))[:, prompts.shape[1]:]
    return vit.norm(t)[:, 0]


def reference_vpt_shallow(vit, x, prompts):
    """LAMDA-PILOT's backbone/vpt.py (Shallow): the prompts appended once, every block, then cut off."""
    t = vit.embed_tokens(x)
    n = t.shape[1]
    t = torch.cat([t, prompts[0][None].expand(x.shape[0], -1, -1)], dim=1)
    for block in vit.blocks:
        t = block(t)
    return vit.norm(t[:, :n])[:, 0]


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_matches_the_reference_forward(deep):
    vit = _vit()
    prompts = VisualPrompts(2 if deep else 1, 3, 16)
    with torch.no_grad():
        prompts.prompts.normal_()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        got = vpt_features(vit, x, prompts)
        want = (reference_vpt_deep if deep else reference_vpt_shallow)(vit, x, prompts.prompts)
        plain = vit(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the prompts do change the embedding


def test_vpt_mean_pooling_never_averages_prompts_and_deep_prompts_are_per_block():
    vit = _vit(pool="mean")
    prompts = VisualPrompts(2, 2, 16)
    with torch.no_grad():
        prompts.prompts.normal_()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        t = vit.embed_tokens(x)
        for i, block in enumerate(vit.blocks):
            t = block(torch.cat([t, prompts.prompts[i][None].expand(3, -1, -1)], dim=1))[:, :4]
        torch.testing.assert_close(vpt_features(vit, x, prompts), vit.norm(t).mean(1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prompt sets"):
        vpt_features(vit, x, VisualPrompts(3, 2, 16))


def test_prompt_inits():
    torch.manual_seed(0)
    assert VisualPrompts(4, 5, 16).prompts.abs().sum() == 0  # backbone/vpt.py: zeros
    p = VisualPrompts(3, 50, 40, init="xavier").prompts
    bound = math.sqrt(6 / (50 * 40 + 40))  # torch's xavier of a (1, P, D) tensor: fan_in P * D, fan_out D
    assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    assert not torch.equal(p[0], p[1])
    with pytest.raises(ValueError, match="prompt init"):
        VisualPrompts(1, 2, 4, init="normal")


# ------------------------------------------------------------------ SSF
def ssf(y, scale, shift):
    return y * scale + shift


def reference_ssf_vit(vit, params, x):
    """LAMDA-PILOT's backbone/vit_ssf.py, written out: SSF after the patch projection, norm1, qkv, the attention's
    proj, norm2, fc1, fc2 and the final norm, with the modules' original weights (`params[name]` = (gamma, beta))."""
    pe = vit.patch_embed.proj.inner
    t = F.conv2d(x, pe.weight, pe.bias, stride=pe.stride).flatten(2).transpose(1, 2)
    t = ssf(t, *params["patch_embed.proj"])
    t = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + vit.pos_embed
    for i, b in enumerate(vit.blocks):
        p = f"blocks.{i}."
        a = ssf(F.layer_norm(t, (16,), b.norm1.inner.weight, b.norm1.inner.bias, b.norm1.inner.eps),
                *params[p + "norm1"])
        q = b.attn.qkv.inner
        qkv = ssf(F.linear(a, q.weight, q.bias), *params[p + "attn.qkv"])
        B, N, _ = qkv.shape
        qh, kh, vh = qkv.reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
        att = ((qh @ kh.transpose(-2, -1)) / math.sqrt(8)).softmax(-1)
        o = (att @ vh).transpose(1, 2).reshape(B, N, 16)
        o = ssf(F.linear(o, b.attn.proj.inner.weight, b.attn.proj.inner.bias), *params[p + "attn.proj"])
        t = t + o
        m = ssf(F.layer_norm(t, (16,), b.norm2.inner.weight, b.norm2.inner.bias, b.norm2.inner.eps),
                *params[p + "norm2"])
        h = F.gelu(ssf(F.linear(m, b.mlp.fc1.inner.weight, b.mlp.fc1.inner.bias), *params[p + "mlp.fc1"]))
        t = t + ssf(F.linear(h, b.mlp.fc2.inner.weight, b.mlp.fc2.inner.bias), *params[p + "mlp.fc2"])
    n = vit.norm.inner
    return ssf(F.layer_norm(t, (16,), n.weight, n.bias, n.eps), *params["norm"])[:, 0]


def test_ssf_matches_the_reference_forward_and_switches_off_to_the_plain_model():
    vit = _vit()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        plain = vit(x)
    names = add_ssf(vit)
    per_block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    assert sorted(names) == sorted(["patch_embed.proj", "norm"] + [f"blocks.{i}.{n}" for i in range(2)
                                                                    for n in per_block])
    assert add_ssf(vit) == []  # once
    modules = dict(vit.named_modules())
    with torch.no_grad():  # far from the init, so that a misplaced SSF shows
        for n in names:
            modules[n].scale.normal_(1.0, 0.3)
            modules[n].shift.normal_(0.0, 0.3)
    assert len(ssf_parameters(vit)) == 2 * len(names)
    params = {n: (modules[n].scale, modules[n].shift) for n in names}
    assert params["blocks.0.attn.qkv"][0].shape == (48,) and params["blocks.1.mlp.fc1"][0].shape == (64,)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), reference_ssf_vit(vit, params, x), rtol=1e-4, atol=1e-5)
        set_ssf_active(vit, False)
        torch.testing.assert_close(vit(x), plain, rtol=0, atol=0)


def test_ssf_init_is_normal_around_identity():
    torch.manual_seed(0)
    s = SSF(nn.Linear(2, 20000), 20000)
    for p, mean in ((s.scale, 1.0), (s.shift, 0.0)):
        assert abs(p.mean().item() - mean) < 1e-3 and abs(p.std().item() - 0.02) < 1e-3
    conv = SSF(nn.Conv2d(3, 5, 2), 5)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        want = conv.inner(x) * conv.scale[None, :, None, None] + conv.shift[None, :, None, None]
        torch.testing.assert_close(conv(x), want)


# ------------------------------------------------------------------ runs
def _run(tmp, overrides=()):
    cfg, _ = load_config(["data/digits-b0inc2"], TINY + list(overrides))
    trainer = Trainer(cfg, tmp, progress=False)
    m = trainer.method
    start = {k: v.clone() for k, v in m.model.state_dict().items()}
    begin = m.begin_task

    def begin_and_keep_the_init(task):  # the first session's module as drawn, to see that it trained
        begin(task)
        if task.index == 0:
            m.peft_init = [p.detach().clone() for p in m.model.peft_parameters()]

    m.begin_task = begin_and_keep_the_init
    res = trainer.fit()
    return trainer, res, start


@pytest.fixture(scope="module")
def aper_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aper")
    return (*_run(tmp), tmp)


def _normalised(scenario, images):
    x = images.float() / 255
    return (x - torch.tensor(scenario.mean).view(1, -1, 1, 1)) / torch.tensor(scenario.std).view(1, -1, 1, 1)


def _plain_key(k):
    return k.replace(".block.", ".").replace(".inner.", ".")


def _check_frozen_and_trained(trainer, start, run_dir, peft_key):
    """The pretrained weights bit for bit; the module (what `peft_key` names) the same in every task checkpoint."""
    now = trainer.method.model.state_dict()
    plain = {_plain_key(k): v for k, v in now.items()}
    for k, v in start.items():
        torch.testing.assert_close(plain[_plain_key(k)], v, rtol=0, atol=0, msg=k)
    module = {k: v for k, v in now.items() if peft_key(k)}
    assert module
    fresh = Trainer(trainer.cfg, run_dir, progress=False)
    tasks = []
    for t, _ in fresh.restore_task_checkpoints():
        sd = fresh.method.model.state_dict()
        for k, v in module.items():
            torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=f"task {t}: {k}")
        tasks.append(t)
    assert tasks == list(range(len(trainer.scenario)))
    return module


def test_adapter_run_learns_and_only_the_first_session_module_trains(aper_run):
    trainer, res, start, run_dir = aper_run
    assert res["tasks_done"] == 3 and res["class_il"]["last"] > 30  # 10 digits: chance is 10
    module = _check_frozen_and_trained(trainer, start, run_dir, lambda k: ".adapters." in k)
    assert all(".adapters.0." in k for k in module)  # one adapter, from the first session
    assert all(v.abs().sum() > 0 for k, v in module.items() if k.endswith("up.weight"))  # up starts at zero


@pytest.mark.parametrize("peft, key", [("vpt-deep", lambda k: k.startswith("prompts.")),
                                       ("vpt-shallow", lambda k: k.startswith("prompts.")),
                                       ("ssf", lambda k: k.endswith((".scale", ".shift")))])
def test_vpt_and_ssf_runs_train_their_module_only(tmp_path, peft, key):
    trainer, res, start = _run(tmp_path, [f"method.peft={peft}", "data.increment=[5,5]"])
    assert res["tasks_done"] == 2
    module = _check_frozen_and_trained(trainer, start, tmp_path, key)
    m = trainer.method.model
    if peft.startswith("vpt"):
        assert m.prompts.prompts.shape == ((2 if peft == "vpt-deep" else 1), 2, 16)
    else:
        assert len(module) == 2 * (2 + 2 * 6)
    now = trainer.method.model.peft_parameters()
    assert len(now) == len(trainer.method.peft_init)
    assert all((p - q).abs().max() > 0 for p, q in zip(now, trainer.method.peft_init))  # every part trained


def test_prototypes_and_scores_are_the_transcription(aper_run):
    trainer, _, _, _ = aper_run
    m, sc = trainer.method, trainer.scenario
    net = m.model.eval()
    vit = net.backbone
    rows = torch.cat([sc[t].train_idx for t in range(3)])
    feats = []
    with torch.no_grad():
        for r in rows.tolist():  # one image at a time: the pretrained model (adapter off), then the adapted one
            x = _normalised(sc, sc.train.images[r:r + 1])
            for b in vit.blocks:
                b.active = None
            f = vit(x)
            for b in vit.blocks:
                b.active = 0
            feats.append(torch.cat([f, vit(x)], dim=1))
    feats = torch.cat(feats)
    labels = sc.train_labels[rows]
    want = torch.stack([feats[labels == c].mean(0) for c in range(10)])
    torch.testing.assert_close(m.prototypes.weight, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(want[:, :16], want[:, 16:])  # the two halves differ: the adapter trained
    x = _normalised(sc, sc.test.images[:5])
    with torch.no_grad():
        scores = m.logits(x)
        q = net.features(x)
    cos = torch.tensor([[float(q[i] @ want[c] / (q[i].norm() * want[c].norm())) for c in range(10)]
                        for i in range(5)])
    torch.testing.assert_close(scores, cos, rtol=1e-4, atol=1e-5)


def test_first_session_loss_is_cross_entropy_of_the_cosine_head(aper_run):
    trainer, _, _, _ = aper_run
    m, sc = trainer.method, trainer.scenario
    task = sc[0]
    m.model.eval()
    idx = task.train_idx[:6]
    x, y = _normalised(sc, sc.train.images[idx]), sc.train_labels[idx]

    class B:
        pass

    batch = B()
    batch.x, batch.y = x, y
    with torch.no_grad():
        loss, _ = m.loss(batch, m.phases(task)[0], task)
        g = m.model.adapted(x)
        head = m.model.head
        logits = head.sigma * torch.stack([torch.stack([g[i] @ head.weight[c] / (g[i].norm() * head.weight[c].norm())
                                                        for c in range(4)]) for i in range(6)])
        want = -torch.log_softmax(logits, 1)[torch.arange(6), y].mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_first_session_setup_trains_module_and_head_with_the_backbone_in_eval(aper_run):
    trainer, _, _, _ = aper_run
    m, task = trainer.method, trainer.scenario[0]
    assert [p.name for p in m.phases(task)] == ["train"]
    assert all(m.phases(trainer.scenario[t]) == [] for t in (1, 2))
    m.setup_phase(m.phases(task)[0], task)
    trainable = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("head.")} == {"head.weight", "head.sigma"}
    assert all(".adapters.0." in n or n.startswith("head.") for n in trainable)
    for name, mod in m.model.backbone.named_modules():
        assert mod.training == ("adapters.0" in name), name
    m.model.requires_grad_(False)
    m.model.eval()


def test_resume_restores_the_prototypes(aper_run):
    trainer, _, _, run_dir = aper_run
    m, sc = trainer.method, trainer.scenario
    x = _normalised(sc, sc.test.images[:6])
    m.model.eval()
    with torch.no_grad():
        want = m.logits(x)
    fresh = Trainer(trainer.cfg, run_dir, progress=False)
    shapes = {t: fresh.method.prototypes.weight.shape for t, _ in fresh.restore_task_checkpoints()}
    assert shapes == {0: (4, 32), 1: (7, 32), 2: (10, 32)}
    r = fresh.method
    r.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(r.logits(x), want, rtol=0, atol=0)
    state = r.extra_state()
    r.load_extra_state({"prototypes": {"weight": None}})
    assert r.prototypes.weight is None
    r.load_extra_state(state)
    torch.testing.assert_close(r.prototypes.weight, m.prototypes.weight, rtol=0, atol=0)


# ------------------------------------------------------------------ parameter count, presets
@pytest.mark.parametrize("peft", ["adapter", "vpt-shallow", "vpt-deep", "ssf"])
def test_parameter_count(peft):
    """Backbone + the module (+ the head in the first session) + prototypes seen x 2d."""
    cfg, _ = load_config(["data/digits-b0inc2"], TINY + [f"method.peft={peft}"])
    rows, _ = param_rows(cfg)
    D, r, depth, P = 16, 4, 2, 2
    module = {"adapter": depth * (D * r + r + r * D + D), "vpt-shallow": P * D, "vpt-deep": depth * P * D,
              "ssf": 2 * (D + D + depth * (D + 3 * D + D + D + 4 * D + D))}[peft]
    m = METHODS.get("aper")(cfg, build_scenario(cfg.data, shapes_only=True), torch.device("cpu"))
    vit = sum(p.numel() for p in m.model.backbone.parameters())
    head = 4 * D + 1
    assert rows[0]["total"] == vit + module + head + 4 * 2 * D
    assert rows[0]["trainable"] == module + head
    for t, seen in ((1, 7), (2, 10)):
        assert rows[t]["total"] == vit + module + seen * 2 * D and rows[t]["trainable"] == 0


def test_presets_load_and_bad_options_are_refused():
    for preset in ("aper/cifar100-b0inc5-vitb16in21k", "aper/fashion-mnist-b0inc2-pretrained"):
        cfg, _ = load_config([preset])
        assert cfg.method.name == "aper" and cfg.model.name == "vit" and cfg.model.pool == "token"
        METHODS.get("aper").check(cfg)
    cfg, _ = load_config(["aper/cifar100-b0inc5-vitb16in21k"])
    t, o = cfg.train, cfg.method
    assert (t.optimizer, t.momentum, t.lr, t.epochs, t.batch_size, t.weight_decay, t.schedule, t.min_lr) == (
        "sgd", 0.9, 0.01, 20, 48, 0.0005, "cosine", 0.0)
    assert (o.peft, o.bottleneck, o.adapter_scale, o.prompt_length, cfg.data.increment) == ("adapter", 64, 0.1, 5, 5)
    small = load_config(["aper/fashion-mnist-b0inc2-pretrained"])[0]
    assert small.model.pretrained is None and small.method.bottleneck == 8 and small.data.train_per_class == 300
    with pytest.raises(ConfigError, match="model.name"):
        load_config(["aper/fashion-mnist-b0inc2-pretrained"], ["model.name=resnet18"])
    for bad, key in (("method.peft=lora", "method.peft"), ("method.bottleneck=0", "method.bottleneck"),
                     ("method.prompt_length=0", "method.prompt_length"),
                     ("method.adapter_dropout=1", "method.adapter_dropout"),
                     ("method.prompt_init=ones", "method.prompt_init")):
        with pytest.raises(ConfigError, match=key):
            load_config(["aper/fashion-mnist-b0inc2-pretrained"], [bad])


def test_params_cli_on_vit_b16(capsys):
    assert main(["params", "aper/cifar100-b0inc5-vitb16in21k", "model.pretrained=null"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first, second, last = lines[-20].split(), lines[-19].split(), lines[-1].split()
    assert first[0] == "1" and last[0] == "20"
    total = [int(v[2].replace(",", "")) for v in (first, second, last)]
    adapter = 12 * (768 * 64 + 64 + 64 * 768 + 768)
    assert int(first[4].replace(",", "")) == adapter + 5 * 768 + 1 and second[4] == last[4] == "0"
    # the first session's head goes; each task adds 5 prototypes of 2 x 768
    assert total[1] - total[0] == 5 * 1536 - (5 * 768 + 1) and total[2] - total[1] == 18 * 5 * 1536
