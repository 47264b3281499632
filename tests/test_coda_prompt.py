"""CODA-Prompt: the component weights and composed prompts, the orthogonality penalty and the Gram-Schmidt draw
against slow transcriptions of the reference; the loss; a tiny 2-task run that keeps the backbone and the first
task's components and head unchanged; the state round trip; the config checks, the presets and #P."""
import math

import pytest
import torch
import torch.nn.functional as F

from vitcl.cli import param_rows
from vitcl.data.build import build_scenario
from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.methods import METHODS, Batch
from vitcl.models.coda_prompt import CodaPrompt, component_weights, gram_schmidt, ortho_penalty
from vitcl.runconfig import load_config

DIGITS = """\
defaults: [data/digits-b0inc2, base/small-vit]
model: {pool: token, patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2}
method: {name: coda-prompt, pool_size: 8, length: 4, layers: [0, 1]}
train: {epochs: 2, batch_size: 16, optimizer: adam, lr: 1.0e-2, weight_decay: 0.0, warmup_epochs: 0}
data: {train_per_class: 16, test_per_class: 8, increment: [5, 5]}
eval: {batch_size: 64}
run: {threads: 1}
"""


def digits_cfg(tmp_path, *overrides):
    path = tmp_path / "coda.yaml"
    path.write_text(DIGITS)
    return load_config([str(path)], list(overrides))[0]


# ------------------------------------------------------------------ formulas against transcriptions
def slow_prompt(q, A, K, P):
    """alpha_bm = cos(q_b * A_m, K_m) entry by entry, prompt_b = sum_m alpha_bm P_m."""
    B, M = q.shape[0], A.shape[0]
    alpha = torch.zeros(B, M, dtype=torch.float64)
    for b in range(B):
        for m in range(M):
            x = [q[b, d].item() * A[m, d].item() for d in range(q.shape[1])]
            k = K[m].tolist()
            dot = sum(u * v for u, v in zip(x, k))
            alpha[b, m] = dot / (math.sqrt(sum(u * u for u in x)) * math.sqrt(sum(v * v for v in k)))
    prompt = torch.zeros(B, *P.shape[1:], dtype=torch.float64)
    for b in range(B):
        for m in range(M):
            prompt[b] += alpha[b, m] * P[m].double()
    return alpha, prompt


def test_component_weights_and_prompt_are_the_transcription():
    g = torch.Generator().manual_seed(0)
    q, A, K, P = (torch.randn(3, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g),
                  torch.randn(5, 4, 6, generator=g))
    alpha, prompt = slow_prompt(q, A, K, P)
    assert torch.allclose(component_weights(q, A, K).double(), alpha, atol=1e-6)
    # the module: two tasks' shares of 2 components, the prompt of block 1 split into keys and values halves
    mod = CodaPrompt(dim=6, key_dim=6, per_task=2, length=4, layers=[1])
    mod.add_task()
    mod.add_task()
    P2, K2, A2 = (torch.cat(list(s)).detach() for s in (mod.layers[0].p, mod.layers[0].k, mod.layers[0].a))
    _, want = slow_prompt(q, A2, K2, P2)
    got = mod.prefixes(q, depth=3)
    assert got[0] is None and got[2] is None
    keys, values = got[1]
    assert keys.shape == values.shape == (3, 2, 6)
    assert torch.allclose(torch.cat([keys, values], 1).double(), want, atol=1e-6)


def test_ortho_penalty_is_the_transcription():
    t = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1))
    rows = t.flatten(1).tolist()
    total = 0.0
    for i in range(4):
        for j in range(4):
            total += (sum(a * b for a, b in zip(rows[i], rows[j])) - (i == j)) ** 2
    assert ortho_penalty(t).item() == pytest.approx(total / 16, rel=1e-5)


def reference_gram_schmidt(old, draws):
    """The reference's loop (GT-RIPL/CODA-Prompt models/zoo.py, commit 605ac87): each new draw minus its
    projection on every earlier vector (old, then the new ones unnormalised), the new ones normalised at the end."""
    us = [u.double() for u in old]
    new = []
    for v in draws.double():
        u = v.clone()
        for w in us:
            u = u - (v @ w) / (w @ w) * w
        us.append(u)
        new.append(u)
    return torch.stack([u / u.norm() for u in new])


def test_gram_schmidt_matches_the_reference_on_orthonormal_old_rows():
    g = torch.Generator().manual_seed(2)
    old = torch.linalg.qr(torch.randn(12, 5, generator=g, dtype=torch.float64)).Q.T.float()  # 5 orthonormal rows
    draws = torch.randn(4, 12, generator=g)
    got = gram_schmidt(old, draws)
    assert torch.allclose(got.double(), reference_gram_schmidt(old, draws), atol=1e-5)


def test_gram_schmidt_is_orthogonal_to_trained_old_rows():
    g = torch.Generator().manual_seed(3)
    old = torch.linalg.qr(torch.randn(10, 4, generator=g)).Q.T + 0.1 * torch.randn(4, 10, generator=g)
    got = gram_schmidt(old, torch.randn(3, 10, generator=g))
    assert (old @ got.T).abs().max() < 1e-5  # exact, where the per-vector projection of the reference is not
    assert torch.allclose(got @ got.T, torch.eye(3), atol=1e-5)
    loose = reference_gram_schmidt(old, torch.randn(3, 10, generator=g)).float()
    assert (old @ loose.T).abs().max() > 1e-3
    with pytest.raises(ValueError, match="do not fit"):
        gram_schmidt(old, torch.randn(7, 10))


def test_a_new_share_is_orthogonal_to_the_old_ones():
    mod = CodaPrompt(dim=8, key_dim=8, per_task=3, length=2, layers=[0])
    mod.add_task()
    with torch.no_grad():  # training moves the first share away from orthogonality
        for store in (mod.layers[0].p, mod.layers[0].k, mod.layers[0].a):
            store[0].add_(0.2 * torch.randn_like(store[0]))
    mod.add_task()
    for store in (mod.layers[0].p, mod.layers[0].k, mod.layers[0].a):
        old, new = store[0].detach().flatten(1), store[1].detach().flatten(1)
        assert (old @ new.T).abs().max() < 1e-5
        assert torch.allclose(new @ new.T, torch.eye(3), atol=1e-5)


# ------------------------------------------------------------------ the method
def test_loss_is_ce_on_the_current_task_plus_the_penalty(tmp_path):
    cfg = digits_cfg(tmp_path, "method.ortho_mu=0.5")
    scenario = build_scenario(cfg.data)
    m = METHODS.get("coda-prompt")(cfg, scenario, torch.device("cpu"))
    for task in scenario:
        m.begin_task(task)
    task = scenario[1]
    m.setup_phase(m.phases(task)[0], task)
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([5, 9, 6, 7])
    loss, logs = m.loss(Batch(x=x, y=y, task=torch.ones(4, dtype=torch.long), index=torch.arange(4)), None, task)
    logits = m.logits(x)
    ce = sum(-F.log_softmax(logits[i, 5:], 0)[y[i] - 5] for i in range(4)) / 4  # old classes masked out
    ortho = sum(ortho_penalty(torch.cat([s.detach() for s in store]))
                for layer in m.net.prompt.layers for store in (layer.p, layer.k, layer.a))
    assert loss.item() == pytest.approx((ce + 0.5 * ortho).item(), rel=1e-5)
    assert logs["ortho"].item() == pytest.approx(0.5 * ortho.item(), rel=1e-5)


def test_two_tasks_keep_the_backbone_and_the_first_share(tmp_path):
    cfg = digits_cfg(tmp_path)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    m = trainer.method
    backbone = {k: v.clone() for k, v in m.net.vit.state_dict().items()}
    snaps, begun = {}, {}
    begin, end = m.begin_task, m.end_task

    def at_begin(task):
        begin(task)
        begun[task.index] = {k: v.clone() for k, v in m.model.state_dict().items() if not k.startswith("vit.")}

    def at_end(task):
        snaps[task.index] = {k: v.clone() for k, v in m.model.state_dict().items() if not k.startswith("vit.")}
        end(task)

    modes = set()
    loss = m.loss
    m.begin_task, m.end_task = at_begin, at_end
    m.loss = lambda b, p, t: (modes.add((m.net.vit.training, m.net.prompt.training)), loss(b, p, t))[1]
    res = trainer.fit()
    assert modes == {(False, True)}  # the frozen backbone trains in eval mode (no dropout)
    assert res["tasks_done"] == 2
    assert all(torch.equal(v, m.net.vit.state_dict()[k]) for k, v in backbone.items())
    final = m.model.state_dict()
    assert snaps[0] and all(torch.equal(v, final[k]) for k, v in snaps[0].items())  # task 0's share and head
    new = [k for k in begun[1] if k not in snaps[0]]
    assert len(new) == 2 * 3 + 2 and all(not torch.equal(begun[1][k], final[k]) for k in new)  # task 1's trained
    # only task 1's share and head train; the count says so
    trainable = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert trainable == {f"prompt.layers.{i}.{s}.1" for i in range(2) for s in "pka"} | {
        "head.heads.1.fc.weight", "head.heads.1.fc.bias"}
    c = m.count_parameters()
    assert c.trainable == 2 * 4 * (4 * 16 + 16 + 16) + 5 * 17
    assert c.total == sum(p.numel() for p in m.model.parameters())


def test_state_round_trip(tmp_path):
    cfg = digits_cfg(tmp_path, "train.epochs=1")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.fit()
    m = trainer.method
    fresh = type(m)(cfg, trainer.scenario, torch.device("cpu"))
    for task in trainer.scenario:  # what a resume does: rebuild the shares, then load
        fresh.begin_task(task)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(3, 1, 8, 8)
    m.model.eval()
    fresh.model.eval()
    assert torch.equal(m.logits(x), fresh.logits(x))


@pytest.mark.parametrize("override, key", [
    ("model.name=resnet18", "model.name"), ("model.pool=mean", "model.pool"), ("method.layers=[0,2]", "method.layers"),
    ("method.pool_size=32", "method.pool_size"), ("method.length=3", "method.length"),
    ("method.ortho_mu=-1", "method.ortho_mu"),
])
def test_bad_configs_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        digits_cfg(tmp_path, override)


def test_fewer_components_than_tasks_is_refused(tmp_path):
    cfg = digits_cfg(tmp_path, "method.pool_size=1")
    with pytest.raises(ConfigError, match=r"method\.pool_size"):
        METHODS.get("coda-prompt")(cfg, build_scenario(cfg.data), torch.device("cpu"))


def test_presets_load_and_count():
    cfg, _ = load_config(["coda-prompt/fashion-mnist-b0inc2-pretrained"], [])
    assert cfg.method.name == "coda-prompt" and cfg.model.pretrained is None and cfg.model.pool == "token"
    cfg, _ = load_config(["coda-prompt/cifar100-b0inc5-vitb16in21k"], ["model.pretrained=null"])
    assert cfg.published.values == {"avg": 89.11, "last": 81.96}
    rows, _ = param_rows(cfg)
    per_task = 5 * 5 * (8 * 768 + 768 + 768) + 5 * 769  # 5 blocks x 5 components (P, K, A), a 5-class head
    assert len(rows) == 20
    assert rows[0]["total"] == 85_798_656 + per_task and rows[0]["trainable"] == per_task
    assert rows[-1]["growth"] == 19 * per_task and rows[-1]["trainable"] == per_task
