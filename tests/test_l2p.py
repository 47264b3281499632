"""L2P: the prompt selection (top-N and the batch-wise vote), the surrogate loss and the prompt placement against
slow transcriptions; the frozen backbone, the parameter count, a tiny run through the engine, the presets."""
import math

import pytest
import torch

from vitcl.cli import param_rows
from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.methods import METHODS
from vitcl.models.prompts import cosine_to_keys, insert_prompts, select_top, surrogate_loss
from vitcl.models.vit import VisionTransformer
from vitcl.runconfig import load_config

TINY_VIT = ["model.embed_dim=16", "model.depth=2", "model.num_heads=2", "model.pool=token", "model.patch_size=4"]
RUN = ["data.train_per_class=12", "data.test_per_class=6", "data.increment=[5,5]",
       "train.epochs=2", "train.batch_size=8", "train.warmup_epochs=0", "train.optimizer=adam", "train.lr=0.01",
       "train.weight_decay=0.0", "train.schedule=constant", "eval.batch_size=64", "run.threads=1",
       "method.name=l2p", "method.pool_size=4", "method.length=2", "method.top_k=2"]


def l2p_cfg(*overrides, preset="finetune/digits-b0inc2"):
    return load_config([preset], [*TINY_VIT, *RUN, *overrides])[0]


# ------------------------------------------------------------------ formulas against transcriptions
def slow_cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_selection_is_each_rows_top_n_by_cosine():
    torch.manual_seed(0)
    q, keys = torch.randn(6, 5), torch.randn(7, 5)
    sim = cosine_to_keys(q, keys)
    for b in range(6):
        slow = [slow_cos(q[b].tolist(), keys[m].tolist()) for m in range(7)]
        assert sim[b].tolist() == pytest.approx(slow, abs=1e-6)
        ranked = sorted(range(7), key=lambda m: -slow[m])[:3]
        assert select_top(sim, 3, batchwise=False)[b].tolist() == ranked


def test_batchwise_selection_takes_the_most_frequent_indices():
    sim = torch.tensor([[.9, .8, .1, .0, .2],   # top-2: 0, 1
                        [.1, .9, .8, .0, .2],   # 1, 2
                        [.0, .7, .1, .9, .2],   # 3, 1
                        [.9, .1, .0, .8, .2]])  # 0, 3
    # counts: 0 -> 2, 1 -> 3, 2 -> 1, 3 -> 2; the vote: 1, then the tie 0/3 to the lower index
    idx = select_top(sim, 2, batchwise=True)
    assert idx.tolist() == [[1, 0]] * 4
    counts = {}
    for row in select_top(sim, 2, batchwise=False).tolist():
        for m in row:
            counts[m] = counts.get(m, 0) + 1
    assert sorted(counts, key=lambda m: (-counts[m], m))[:2] == [1, 0]


def test_surrogate_loss_is_the_batch_mean_of_summed_one_minus_cosine():
    torch.manual_seed(1)
    q, keys = torch.randn(4, 6), torch.randn(5, 6)
    idx = torch.tensor([[0, 3], [1, 2], [4, 0], [2, 2]])
    slow = sum(1 - slow_cos(q[b].tolist(), keys[m].tolist()) for b in range(4) for m in idx[b].tolist()) / 4
    assert surrogate_loss(q, keys, idx).item() == pytest.approx(slow, rel=1e-5)
    # the reference's -sum cos / B differs by the constant N: the same gradient
    k = keys.clone().requires_grad_(True)
    surrogate_loss(q, k, idx).backward()
    k2 = keys.clone().requires_grad_(True)
    qn, kn = q / q.norm(dim=1, keepdim=True), k2 / k2.norm(dim=1, keepdim=True)
    (-(qn[:, None] * kn[idx]).sum() / 4).backward()
    assert torch.allclose(k.grad, k2.grad, atol=1e-6)


def test_prompts_go_after_the_class_token_with_its_position_embedding():
    torch.manual_seed(0)
    vit = VisionTransformer(8, 1, embed_dim=16, depth=2, num_heads=2, patch_size=4, pool="token").eval()
    x, prompts = torch.randn(3, 1, 8, 8), torch.randn(3, 4, 16)
    tokens = vit.embed_tokens(x)
    seq = insert_prompts(vit, tokens, prompts)
    # manual: [cls + pos_0, prompts + pos_0, patches + pos_1..]
    patches = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    cls = vit.cls_token.expand(3, -1, -1) + vit.pos_embed[:, :1]
    manual = torch.cat([cls, prompts + vit.pos_embed[:, :1], patches], dim=1)
    assert seq.shape == (3, 1 + 4 + 4, 16)
    assert torch.allclose(seq, manual, atol=1e-6)
    assert torch.allclose(vit.forward_blocks(seq), vit.forward_blocks(manual), atol=1e-6)


def test_model_features_read_the_mean_of_the_prompt_outputs():
    cfg = l2p_cfg()
    from vitcl.data.build import build_scenario
    scenario = build_scenario(cfg.data)
    m = METHODS.get("l2p")(cfg, scenario, torch.device("cpu"))
    m.begin_task(scenario[0])
    model = m.model.eval()
    x = torch.randn(5, 1, 8, 8)
    logits, q, idx = model(x)
    assert torch.allclose(q, model.backbone(x))  # the query: the frozen ViT's class token without prompts
    assert torch.equal(idx, select_top(cosine_to_keys(q, model.pool.keys), 2, False))
    b = model.backbone
    for i in range(5):  # one image at a time, the prompts concatenated by hand
        p = torch.cat([model.pool.prompts[j] for j in idx[i].tolist()])[None]
        cls = b.cls_token + b.pos_embed[:, :1]
        seq = torch.cat([cls, p + b.pos_embed[:, :1], b.patch_embed(x[i:i + 1]) + b.pos_embed[:, 1:]], 1)
        feat = b.forward_blocks(seq)[:, 1:1 + p.shape[1]].mean(1)
        assert torch.allclose(logits[i], model.head(feat)[0], atol=1e-5)


# ------------------------------------------------------------------ training: what is frozen, what trains
def test_tiny_run_keeps_the_backbone_and_trains_prompts_keys_and_heads(tmp_path):
    trainer = Trainer(l2p_cfg(), tmp_path, progress=False)
    m = trainer.method
    before = {k: v.clone() for k, v in m.model.backbone.state_dict().items()}
    pool_before = {k: v.clone() for k, v in m.model.pool.state_dict().items()}
    heads = []
    original = m.end_task
    m.end_task = lambda t: (heads.append([h.fc.weight.detach().clone() for h in m.model.head.heads]), original(t))
    res = trainer.fit()
    assert res["tasks_done"] == 2
    for k, v in m.model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in m.model.pool.state_dict().items():
        assert not torch.equal(v, pool_before[k]), k
    assert torch.equal(heads[0][0], heads[1][0])  # task 0's head stays as it was after task 0
    assert not m.model.backbone.training
    assert 0 <= res["class_il"]["last"] <= 100


def test_parameter_count_trainable_is_prompts_keys_and_the_current_head():
    cfg = l2p_cfg()
    rows, _ = param_rows(cfg)
    vit = VisionTransformer(8, 1, cfg.model)
    backbone = sum(p.numel() for p in vit.parameters())
    pool = 4 * 2 * 16 + 4 * 16
    head = 16 * 5 + 5
    assert [r["total"] for r in rows] == [backbone + pool + head, backbone + pool + 2 * head]
    assert [r["trainable"] for r in rows] == [pool + head, pool + head]


def test_check_rejects_backbones_without_a_class_token():
    with pytest.raises(ConfigError, match="model.pool"):
        METHODS.get("l2p").check(l2p_cfg("model.pool=mean"))
    with pytest.raises(ConfigError, match="top_k"):
        l2p_cfg("method.top_k=5")


@pytest.mark.parametrize("preset", ["l2p/cifar100-b0inc5-vitb16in21k", "l2p/fashion-mnist-b0inc2-pretrained"])
def test_presets_load_and_pass_the_check(preset):
    cfg = load_config([preset], ["model.pretrained=null"])[0]
    METHODS.get("l2p").check(cfg)
    assert cfg.method.name == "l2p"


def test_vit_b16_preset_counts():
    cfg = load_config(["l2p/cifar100-b0inc5-vitb16in21k"], ["model.pretrained=null"])[0]
    rows, _ = param_rows(cfg)
    pool = 10 * 5 * 768 + 10 * 768
    assert rows[0]["trainable"] == pool + 768 * 5 + 5
    assert rows[-1]["total"] - rows[0]["total"] == 19 * (768 * 5 + 5)
    assert rows[0]["total"] == 85_798_656 + pool + 768 * 5 + 5
