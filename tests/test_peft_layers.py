"""The pieces the methods on pretrained ViTs share: prefix attention, the ViT's token/blocks split, parallel
adapters, lr scales per parameter group, class prototypes; each against a direct transcription."""
import math

import torch
from torch import nn

from vitcl.config import OptimConfig
from vitcl.engine.optim import build_optimizer, set_lr
from vitcl.methods.prototypes import Prototypes, per_class_means
from vitcl.models.adapters import Adapter, adapter_parameters, add_adapters, set_active_adapter
from vitcl.models.layers import Attention
from vitcl.models.vit import VisionTransformer


def slow_prefix_attention(attn: Attention, x, pk, pv):
    B, N, C = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).split(C, dim=-1)
    k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
    out = torch.zeros(B, N, C)
    for b in range(B):
        for i in range(h):
            s = slice(i * d, (i + 1) * d)
            w = (q[b, :, s] @ k[b, :, s].T / math.sqrt(d)).softmax(-1)
            out[b, :, s] = w @ v[b, :, s]
    return attn.proj(out)


def test_prefix_attention_matches_transcription():
    torch.manual_seed(0)
    attn = Attention(16, 4, qkv_bias=True).eval()
    x, pk, pv = torch.randn(2, 5, 16), torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    torch.testing.assert_close(attn(x, (pk, pv)), slow_prefix_attention(attn, x, pk, pv), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(attn(x, (pk, pv)), attn(x))


def test_vit_split_and_prefixes():
    torch.manual_seed(0)
    vit = VisionTransformer(16, 3, patch_size=4, embed_dim=16, depth=3, num_heads=2).eval()
    x = torch.randn(2, 3, 16, 16)
    tokens = vit.embed_tokens(x)
    assert tokens.shape == (2, 17, 16) and vit.num_prefix_tokens == 1
    torch.testing.assert_close(vit.forward_blocks(tokens), vit.forward_features(x))
    torch.testing.assert_close(vit.forward_blocks(tokens, [None, None]), vit.forward_features(x))
    p = (torch.randn(2, 2, 16), torch.randn(2, 2, 16))
    expect = vit.blocks[0](tokens, p)
    for blk in list(vit.blocks)[1:]:
        expect = blk(expect)
    torch.testing.assert_close(vit.forward_blocks(tokens, [p]), vit.norm(expect))


def test_adapter_starts_as_identity_and_is_parallel():
    torch.manual_seed(0)
    vit = VisionTransformer(16, 3, patch_size=4, embed_dim=16, depth=2, num_heads=2).eval()
    x = torch.randn(2, 3, 16, 16)
    plain = vit.forward_features(x)
    assert add_adapters(vit, bottleneck=4, scale=0.5) == 0
    set_active_adapter(vit, 0)
    torch.testing.assert_close(vit.forward_features(x), plain)  # up-projection starts at zero
    for p in adapter_parameters(vit, 0):
        nn.init.normal_(p)
    t = vit.embed_tokens(x)
    expect = t
    for ab in vit.blocks:
        b, ad = ab.block, ab.adapters[0]
        h = expect + b.attn(b.norm1(expect))
        expect = h + b.mlp(b.norm2(h)) + 0.5 * ad.up(torch.relu(ad.down(h)))
    torch.testing.assert_close(vit.forward_features(x), vit.norm(expect))
    assert add_adapters(vit, bottleneck=4) == 1 and len(adapter_parameters(vit, 1)) == 8
    set_active_adapter(vit, None)
    torch.testing.assert_close(vit.forward_features(x), plain)
    assert isinstance(vit.blocks[0].adapters[1], Adapter)


def test_lr_scales_make_groups_that_keep_their_factor():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    named = list(model.named_parameters())
    opt = build_optimizer(named, OptimConfig(optimizer="sgd", lr=0.1, weight_decay=1e-4), {"0": 0.01})
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert math.isclose(by_param[id(model[0].weight)]["lr"], 0.001)
    assert by_param[id(model[0].bias)]["weight_decay"] == 0.0
    assert by_param[id(model[1].weight)]["lr"] == 0.1
    set_lr(opt, 0.5)
    assert math.isclose(by_param[id(model[0].weight)]["lr"], 0.005) and by_param[id(model[1].bias)]["lr"] == 0.5


def test_prototypes_are_class_means_and_score_by_cosine():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g) + 2
    classes, means = per_class_means(feats, labels)
    for c, m in zip(classes.tolist(), means):
        torch.testing.assert_close(m, feats[labels == c].mean(0))
    protos = Prototypes()
    protos.set(classes, means, 5)
    scores = protos(feats[:4])
    for i in range(4):
        for c in range(2, 5):
            assert math.isclose(float(scores[i, c]), float(torch.cosine_similarity(feats[i], means[c - 2], dim=0)),
                                abs_tol=1e-5)
    assert (scores[:, :2] == 0).all()  # rows not set yet
