"""LVT: inter-task attention, importance estimation, consolidation loss, confidence memory, distillation, and a
tiny end-to-end run."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import interrupt_at_epoch, restored
from vitcl.data.memory import FixedTotal, Memory, make_selector
from vitcl.methods.losses import stored_distillation as distillation_loss
from vitcl.methods.lvt import consolidation_loss, estimate_importance
from vitcl.models.lvt import InterTaskAttention
from vitcl.runconfig import load_config


# --------------------------------------------------------------------------------------------- attention
def direct_inter_task_attention(attn: InterTaskAttention, x: torch.Tensor) -> torch.Tensor:
    """A slow transcription of A = softmax(Q K_Wᵀ/√d + B), out = A V, head by head and query by query."""
    B, N, C = x.shape
    H, d = attn.num_heads, attn.head_dim
    Wq, Wv = attn.qv.weight[:C], attn.qv.weight[C:]
    bq, bv = attn.qv.bias[:C], attn.qv.bias[C:]
    heads = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        Q = x @ Wq[sl].T + bq[sl]  # (B, N, d)
        V = x @ Wv[sl].T + bv[sl]
        K = attn.external_key[h]  # (N, d): one key per position, the same for every sample
        out = torch.zeros(B, N, d, dtype=x.dtype)
        for b in range(B):
            for i in range(N):
                scores = torch.stack([Q[b, i] @ K[j] / math.sqrt(d) + attn.attn_bias[h, i, j] for j in range(N)])
                a = torch.exp(scores - scores.max())
                a = a / a.sum()
                out[b, i] = (a[:, None] * V[b]).sum(0)
        heads.append(out)
    return attn.proj(torch.cat(heads, dim=-1))


def test_inter_task_attention_matches_direct_transcription():
    torch.manual_seed(0)
    attn = InterTaskAttention(dim=12, num_tokens=5, num_heads=3, key_std=0.5).double()
    with torch.no_grad():
        attn.attn_bias.normal_(0, 0.7)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    fast, slow = attn(x), direct_inter_task_attention(attn, x)
    assert torch.allclose(fast, slow, atol=1e-10)
    # gradients reach K_W and B through SDPA's additive mask exactly as through the transcription
    gk, gb, gx = torch.autograd.grad((fast ** 2).sum(), [attn.external_key, attn.attn_bias, x])
    hk, hb, hx = torch.autograd.grad((slow ** 2).sum(), [attn.external_key, attn.attn_bias, x])
    for a, b in ((gk, hk), (gb, hb), (gx, hx)):
        assert torch.allclose(a, b, atol=1e-9)
    probs = attn.attention_map(x)
    assert probs.shape == (2, 3, 5, 5) and torch.allclose(probs.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))


def test_inter_task_attention_shapes_and_token_check():
    attn = InterTaskAttention(dim=16, num_tokens=4, num_heads=2)
    assert attn.external_key.shape == (2, 4, 8) and attn.attn_bias.shape == (2, 4, 4)
    # fewer parameters than self-attention's 4·C² when N·C + H·N² < C²
    n = sum(p.numel() for p in attn.parameters())
    assert n == 16 * 32 + 32 + 2 * 4 * 8 + 2 * 16 + 16 * 16 + 16
    with pytest.raises(ValueError, match="one per token position"):
        attn(torch.randn(1, 5, 16))


def test_lvt_backbone_counts_and_consolidated_parameters():
    cfg, _ = load_config(["lvt/cifar100-10tasks-m200"])
    from vitcl.models import create_backbone

    net = create_backbone(cfg.model, 32, 3)
    total = sum(p.numel() for p in net.parameters())
    assert total == 8_850_544  # + 100-class accumulation head (512·100 + 100) = 8,901,844: "8.9M"
    assert total + 512 * 100 + 100 == 8_901_844
    assert net.grids == [16, 8, 4]
    names = net.consolidated_parameters()
    assert len(names) == 12 and all(n.endswith(("external_key", "attn_bias")) for n in names)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


# --------------------------------------------------------------------------------------------- importance
def test_importance_hand_computed():
    """One head, d = 1, two tokens; W_Q = W_V = 1 (no bias), proj = identity, K_W = 0, B = 0, so every attention
    row is (1/2, 1/2) and out_i = mean(v). For L = Σ_i out_i:
        ∂L/∂B_ij = A_ij (v_j − out_i) = (v_j − v̄)/2,     ∂L/∂K_j = Σ_i A_ij (v_j − out_i) q_i = (v_j − v̄)/2 · Σ_i q_i
    (q = v = the token values). Batch 1: tokens (1, 3): v̄ = 2, ∂B = [[-1/2, 1/2], [-1/2, 1/2]], ∂K = (-2, 2).
    Batch 2: tokens (2, 2): every gradient is 0. Mean gradient: ∂B/2 and ∂K/2; mean square: ∂B²/2, ∂K²/2."""
    attn = InterTaskAttention(dim=1, num_tokens=2, num_heads=1, qv_bias=False)
    with torch.no_grad():
        attn.qv.weight.fill_(1.0)
        attn.proj.weight.fill_(1.0)
        attn.proj.bias.zero_()
        attn.external_key.zero_()
        attn.attn_bias.zero_()
    params = {"K": attn.external_key, "B": attn.attn_bias}
    batches = [torch.tensor([[[1.0], [3.0]]]), torch.tensor([[[2.0], [2.0]]])]
    stats = estimate_importance(params, batches, lambda x: attn(x).sum())
    gK = torch.tensor([-2.0, 2.0]).view(1, 2, 1)
    gB = torch.tensor([[-0.5, 0.5], [-0.5, 0.5]]).view(1, 2, 2)
    for kind, f in (("mean", lambda g: g / 2), ("magnitude", lambda g: g.abs() / 2), ("squared", lambda g: g ** 2 / 2)):
        assert torch.allclose(stats[kind]["K"], f(gK)) and torch.allclose(stats[kind]["B"], f(gB)), kind


def test_consolidation_loss_zero_at_anchor_and_grows_with_weighted_distance():
    torch.manual_seed(0)
    p = {"K": torch.randn(2, 3), "B": torch.randn(4)}
    anchor = {k: v.clone() for k, v in p.items()}
    omega = {"K": torch.rand(2, 3), "B": torch.rand(4)}
    for form in ("quadratic", "abs-inner"):
        assert consolidation_loss(p, anchor, omega, form).item() == 0.0
    direction = {k: torch.randn_like(v) for k, v in p.items()}
    last = 0.0
    for step in (0.1, 0.2, 0.5, 1.0):
        moved = {k: anchor[k] + step * direction[k] for k in p}
        q = consolidation_loss(moved, anchor, omega, "quadratic").item()
        expected = sum((omega[k] * (step * direction[k]) ** 2).sum().item() for k in p)
        assert q == pytest.approx(expected, rel=1e-5) and q > last
        last = q
        a = consolidation_loss(moved, anchor, omega, "abs-inner").item()
        assert a == pytest.approx(sum(abs((omega[k] * step * direction[k]).sum().item()) for k in p), rel=1e-5)
    # moving an unimportant entry costs nothing; the same move of an important one costs Ω·Δ²
    omega = {"K": torch.zeros(2, 3), "B": torch.tensor([0.0, 0.0, 0.0, 2.0])}
    moved = {"K": anchor["K"] + 1.0, "B": anchor["B"].clone()}
    assert consolidation_loss(moved, anchor, omega).item() == 0.0
    moved["B"][3] += 0.5
    assert consolidation_loss(moved, anchor, omega).item() == pytest.approx(2.0 * 0.25)


# --------------------------------------------------------------------------------------------- memory
def test_confidence_selection_keeps_most_confident_per_class():
    torch.manual_seed(0)
    scores = torch.rand(30)
    classes = torch.arange(30) % 3 + 4  # classes 4, 5, 6, ten samples each
    memory = Memory(FixedTotal(12), make_selector("confidence"))
    candidates = torch.arange(100, 130)
    logits = torch.randn(30, 7)
    memory.add(candidates, classes, scores, n_seen=3, extras={"logits": logits})
    for c in (4, 5, 6):
        rows = (classes == c).nonzero().flatten()
        best = rows[scores[rows].argsort(descending=True)[:4]]
        assert memory.exemplars[c].tolist() == candidates[best].tolist()
        assert torch.equal(memory.extras["logits"][c], logits[best])
    # a new task: 12 / 6 = 2 per class; old classes keep their 2 most confident
    memory.add(torch.arange(200, 206), torch.tensor([7, 7, 8, 8, 9, 9]), torch.tensor([.1, .9, .5, .6, .3, .2]), 6)
    for c in (4, 5, 6):
        rows = (classes == c).nonzero().flatten()
        assert memory.exemplars[c].tolist() == candidates[rows[scores[rows].argsort(descending=True)[:2]]].tolist()
    assert memory.exemplars[7].tolist() == [201, 200] and memory.exemplars[9].tolist() == [204, 205]


def test_confidence_selection_ties_are_deterministic():
    sel = make_selector("confidence")
    out = sel.select(torch.tensor([0.5, 0.5, 0.9, 0.5]), torch.zeros(4, dtype=torch.long), 3)
    assert out[0].tolist() == [2, 0, 1]


# --------------------------------------------------------------------------------------------- distillation
def test_distillation_matches_kd_on_the_stored_width():
    torch.manual_seed(0)
    a, z = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6)
    width = torch.tensor([2, 4, 6])
    got = distillation_loss(a, z, width, T=2.0)
    want = 0.0
    for i, w in enumerate(width.tolist()):
        p = F.softmax(z[i, :w] / 2, 0)
        want = want + 4.0 * (p * (p.log() - F.log_softmax(a[i, :w] / 2, 0))).sum()
    assert got.item() == pytest.approx(want.item() / 3, rel=1e-5)
    got.backward()
    assert torch.isfinite(a.grad).all() and a.grad[0, 2:].abs().sum() == 0
    assert distillation_loss(z.clone(), z, width, 2.0).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------- end to end
def test_lvt_digits_end_to_end(tmp_path):
    from vitcl.engine.trainer import Trainer

    cfg, _ = load_config(["lvt/digits-b0inc2"], ["train.epochs=1", "train.max_batches=2", "data.increment=5",
                                                 "memory.size=20", "run.progress=false", "eval.batch_size=512"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    (tmp_path / "run").mkdir()
    res = trainer.fit()
    assert res["tasks_done"] == 2 and res["class_il"] is not None and res["task_il"] is not None
    m = trainer.method
    assert len(m.memory) == 20 and set(m.memory.exemplars) == set(range(10))
    assert m.memory.extra("logits").shape == (20, 10)
    assert m.anchor is not None and set(m.anchor) == set(m.model.backbone.consolidated_parameters())
    # the importance is normalised to a maximum of 1
    assert max(v.max().item() for v in m.importance.values()) == pytest.approx(1.0)
    # the injection head is training-only: the parameter count is the backbone plus h_A
    count = m.count_parameters().total
    assert count == sum(p.numel() for p in m.model.backbone.parameters()) + 64 * 10 + 10
    # resume state round-trips
    state = m.state_dict()
    m.load_state_dict(state)
    assert m.anchor is not None


def test_single_classifier_ablation_and_abs_inner_run(tmp_path):
    from vitcl.engine.trainer import Trainer

    cfg, _ = load_config(["lvt/digits-b0inc2"], ["train.epochs=1", "train.max_batches=1", "data.increment=5",
                                                 "memory.size=10", "method.dual=false",
                                                 "method.consolidation=abs-inner", "run.progress=false"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    (tmp_path / "run").mkdir()
    res = trainer.fit()
    assert res["tasks_done"] == 2 and trainer.method.model.injection is None


def test_lvt_presets_load():
    for n in (5, 10, 20):
        for m in (200, 500):
            cfg, _ = load_config([f"lvt/cifar100-{n}tasks-m{m}"])
            assert cfg.method.name == "lvt" and cfg.memory.size == m and cfg.memory.selection == "confidence"
            assert cfg.data.increment == 100 // n and cfg.data.dataset == "cifar100"
            t = cfg.train
            assert (t.optimizer, t.lr, t.batch_size, t.epochs, t.momentum) == ("sgd", 0.1, 32, 50, 0.0)
            a = cfg.data.augment
            assert a.randaugment is None and a.randaugment_n == 0 and a.crop_padding == 4
            o = cfg.method
            assert (o.alpha, o.beta, o.gamma, o.r0, o.r_decay, o.temperature) == (2.0, 2.0, 2.0, 1.0, 0.9, 2.0)


def test_lvt_options_are_validated():
    from vitcl.errors import ConfigError

    with pytest.raises(ConfigError, match="model.heads"):
        load_config(["lvt/digits-b0inc2"], ["model.heads=[3,2]"])
    with pytest.raises(ConfigError, match="model.depths"):
        load_config(["lvt/digits-b0inc2"], ["model.depths=[1]"])
    with pytest.raises(ConfigError, match="method.importance_decay"):
        load_config(["lvt/digits-b0inc2"], ["method.importance_decay=2"])
    with pytest.raises(ConfigError, match="method.consolidation"):
        load_config(["lvt/digits-b0inc2"], ["method.consolidation=l2"])


def test_lvt_rejects_a_backbone_without_inter_task_attention():
    from vitcl.errors import ConfigError

    with pytest.raises(ConfigError, match="inter-task attention"):  # when the config is built, before any data
        load_config(["lvt/digits-b0inc2", "base/small-vit"], ["run.progress=false"])


def _lvt_trainer(run_dir, *overrides):
    from vitcl.engine.trainer import Trainer

    tiny = ["data.train_per_class=24", "data.test_per_class=10", "train.batch_size=16", "eval.batch_size=64",
            "run.progress=false"]
    cfg, _ = load_config(["lvt/digits-b0inc2"], [*tiny, "data.increment=5", "memory.size=20", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, run_dir, progress=False)


def test_lvt_resume_mid_task_is_exact(tmp_path):
    """Importance, anchor, memory and stored logits survive a checkpoint: a run stopped inside task 1 and resumed
    gives the uninterrupted run's accuracies."""
    opts = ("train.epochs=2", "train.max_batches=2")
    full = _lvt_trainer(tmp_path / "a", *opts).fit()
    t = _lvt_trainer(tmp_path / "b", *opts)
    interrupt_at_epoch(t, 4)  # task 1, after its first epoch was checkpointed
    resumed = _lvt_trainer(tmp_path / "b", *opts)
    opt_state = restored(resumed, tmp_path / "b" / "checkpoints" / "last.pt")
    assert (resumed.state.task, resumed.state.epoch) == (1, 1) and resumed.method.anchor is not None
    res = resumed.fit(opt_state)
    assert res["class_il"]["acc_matrix"] == full["class_il"]["acc_matrix"]


def test_lvt_bf16_run(tmp_path):
    res = _lvt_trainer(tmp_path / "r", "run.precision=bf16", "train.epochs=1", "train.max_batches=2").fit()
    assert res["tasks_done"] == 2 and all(math.isfinite(a) for a in res["class_il"]["seen_acc"])
