"""ConViT / DyTox attention: every variant against a slow, direct transcription of its formula; init facts;
the batched task decoder against the per-task loop (forward and gradients); parameter counts of
docs/methods/dytox.md#parameter-counts."""
import math

import pytest
import torch

from vitcl.errors import ConfigError
from vitcl.models import create_backbone
from vitcl.models.convit import (
    GPSA,
    ClassAttention,
    ConViT,
    TaskAttentionBlock,
    TaskDecoder,
    TokenDropPath,
    relative_positions,
)
from vitcl.models.layers import Attention
from vitcl.runconfig import load_config


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def randomize_(module, scale=0.3):
    """Move every parameter off its init so that the tests see generic values (gates, biases, norms)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


# --------------------------------------------------------------------------------------------- slow references
def slow_rel_indices(num_patches):
    """ConViT's get_rel_indices, written out element by element."""
    s = int(num_patches**0.5)
    r = torch.zeros(num_patches, num_patches, 3)
    for q in range(num_patches):
        for k in range(num_patches):
            dx = (k % s) - (q % s)
            dy = (k // s) - (q // s)
            r[q, k] = torch.tensor([dx, dy, dx * dx + dy * dy])
    return r


def slow_gpsa(m: GPSA, x):
    B, N, C = x.shape
    H, d = m.num_heads, C // m.num_heads
    qk = x @ m.qk.weight.T + (m.qk.bias if m.qk.bias is not None else 0)
    q, k = qk[..., :C], qk[..., C:]
    v = x @ m.v.weight.T + (m.v.bias if m.v.bias is not None else 0)
    r = slow_rel_indices(N).to(x.dtype)
    pos_logits = r @ m.pos_proj.weight.T + m.pos_proj.bias  # (N, N, H)
    outs = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        content = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
        pos = torch.softmax(pos_logits[..., h], dim=-1)[None]
        gate = torch.sigmoid(m.gating_param[h])
        attn = (1 - gate) * content + gate * pos
        attn = attn / attn.sum(-1, keepdim=True)  # the public code's renormalisation
        outs.append(attn @ v[..., sl])
    return torch.cat(outs, -1) @ m.proj.weight.T + m.proj.bias


def slow_mhsa(m: Attention, x):
    B, N, C = x.shape
    H, d = m.num_heads, C // m.num_heads
    qkv = x @ m.qkv.weight.T + (m.qkv.bias if m.qkv.bias is not None else 0)
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    outs = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        outs.append(torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), -1) @ v[..., sl])
    return torch.cat(outs, -1) @ m.proj.weight.T + m.proj.bias


def slow_class_attention(m: ClassAttention, z):
    """CaiT: z = [token; patches] (B, 1+N, C) normalised; q from z[:, 0], k and v from all of z."""
    B, L, C = z.shape
    H, d = m.num_heads, C // m.num_heads
    q = z[:, :1] @ m.q.weight.T
    k = z @ m.k.weight.T
    v = z @ m.v.weight.T
    outs = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), -1)
        outs.append(a @ v[..., sl])
    return torch.cat(outs, -1) @ m.proj.weight.T + m.proj.bias


# --------------------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("grid", [2, 3, 8])
def test_relative_positions_match_convit(grid):
    r = relative_positions(grid)
    assert r.shape == (grid**2, grid**2, 3)
    assert torch.equal(r, slow_rel_indices(grid**2))
    # key - query: the patch to the right of the query has dx = +1
    assert r[0, 1].tolist() == [1.0, 0.0, 1.0] and r[0, grid].tolist() == [0.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------- GPSA
@pytest.mark.parametrize("training", [False, True])
def test_gpsa_matches_formula(training):
    torch.manual_seed(0)
    m = GPSA(24, 6, qkv_bias=True).double()
    randomize_(m)
    m.train(training)
    x = torch.randn(3, 16, 24, dtype=torch.float64)
    torch.testing.assert_close(m(x), slow_gpsa(m, x), rtol=1e-10, atol=1e-10)


def test_gpsa_attention_map_rows_are_distributions():
    torch.manual_seed(0)
    m = GPSA(24, 4).double()
    randomize_(m)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    a = m.attention_map(x)
    assert a.shape == (2, 4, 9, 9)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 9, dtype=torch.float64))


def test_gpsa_local_init():
    torch.manual_seed(0)
    m = GPSA(384, 12)
    assert torch.equal(m.v.weight, torch.eye(384))
    assert torch.equal(m.gating_param, torch.ones(12))
    assert torch.equal(m.pos_proj.bias, torch.zeros(12))
    w = m.pos_proj.weight
    c = 1  # int(sqrt(12)) = 3: a 3x3 kernel centred on 1
    for h1 in range(3):
        for h2 in range(3):
            assert w[h1 + 3 * h2].tolist() == [2.0 * (h2 - c), 2.0 * (h1 - c), -1.0]
    # heads 9..11 keep their trunc-normal(0.02) init
    rest = w[9:]
    assert rest.abs().max() < 0.05 and rest.abs().max() > 0
    assert m.qk.weight.std().item() == pytest.approx(0.02, rel=0.15)
    # at init, local head 4 (the centre, offset (0, 0)) attends most to the query's own patch
    pos = m.positional_attention(64, torch.device("cpu"))
    assert torch.equal(pos[4].argmax(-1), torch.arange(64))


def test_gpsa_local_init_even_kernel():
    m = GPSA(16, 4)  # kernel 2, centre 0.5: offsets (+-1, +-1)
    assert m.pos_proj.weight.tolist() == [[-1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [1.0, 1.0, -1.0]]


def test_gpsa_attention_dropout_path_matches_in_expectation_free_case():
    # with attn_drop = 0 the explicit (dropout) path and the SDPA path are the same function
    torch.manual_seed(0)
    m = GPSA(24, 6).double()
    randomize_(m)
    m.train()
    x = torch.randn(2, 16, 24, dtype=torch.float64)
    explicit = (m.attention_map(x) @ m._qkv(x)[2]).transpose(1, 2).reshape(2, 16, 24)
    torch.testing.assert_close(m(x), m.proj(explicit))


# --------------------------------------------------------------------------------------------- MHSA, CA
def test_mhsa_matches_formula():
    torch.manual_seed(0)
    m = Attention(24, 4, qkv_bias=False).double()
    randomize_(m)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    torch.testing.assert_close(m(x), slow_mhsa(m, x))


def test_class_attention_matches_cait():
    torch.manual_seed(0)
    m = ClassAttention(24, 4).double()
    randomize_(m)
    z = torch.randn(3, 1 + 16, 24, dtype=torch.float64)
    out = m(z[:, :1], z[:, 1:])
    assert out.shape == (3, 1, 24)
    torch.testing.assert_close(out, slow_class_attention(m, z))


def test_class_attention_many_tokens_each_sees_itself_and_patches_only():
    torch.manual_seed(0)
    m = ClassAttention(24, 4).double()
    randomize_(m)
    tokens = torch.randn(3, 5, 24, dtype=torch.float64)
    patches = torch.randn(3, 16, 24, dtype=torch.float64)
    out = m(tokens, patches)
    for i in range(5):
        ref = slow_class_attention(m, torch.cat([tokens[:, i:i + 1], patches], 1))
        torch.testing.assert_close(out[:, i:i + 1], ref)


def test_task_attention_block_matches_formula():
    torch.manual_seed(0)
    blk = TaskAttentionBlock(24, 4, mlp_ratio=2.0).double()
    randomize_(blk)
    blk.eval()
    token = torch.randn(2, 1, 24, dtype=torch.float64)
    patches = torch.randn(2, 16, 24, dtype=torch.float64)
    z = blk.norm1(torch.cat([token, patches], 1))  # LN over all tokens
    t1 = token + slow_class_attention(blk.attn, z)
    t2 = t1 + blk.mlp(blk.norm2(t1))
    torch.testing.assert_close(blk(token, patches), t2)


# --------------------------------------------------------------------------------------------- batched decoder
def _decoder_pair(n_blocks=2, drop_path=0.1):
    torch.manual_seed(0)
    blocks = [TaskAttentionBlock(32, 4, drop_path=drop_path) for _ in range(n_blocks)]
    batched = TaskDecoder(blocks, "batched")
    randomize_(batched, 0.1)
    return batched


@pytest.mark.parametrize("T", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_decoder_equals_per_task_loop_forward_and_gradients(T, dtype):
    dec = _decoder_pair().to(dtype)
    dec.eval()  # drop-path off (random masks differ between the two orders of computation)
    tokens = torch.randn(1, T, 32, dtype=dtype, requires_grad=True)
    patches = torch.randn(4, 16, 32, dtype=dtype, requires_grad=True)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    grads = {}
    outs = {}
    for mode in ("batched", "loop"):
        dec.mode = mode
        dec.zero_grad()
        tokens.grad = patches.grad = None
        out = dec(tokens, patches)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        outs[mode] = out.detach()
        grads[mode] = [tokens.grad.clone(), patches.grad.clone()] + [p.grad.clone() for p in dec.parameters()]
    assert outs["batched"].shape == (4, T, 32)
    torch.testing.assert_close(outs["batched"], outs["loop"], **tol)
    for gb, gl in zip(grads["batched"], grads["loop"]):
        torch.testing.assert_close(gb, gl, **tol)


def test_batched_decoder_equals_loop_in_training_mode_without_drop_path():
    dec = _decoder_pair(drop_path=0.0)
    dec.train()
    tokens, patches = torch.randn(1, 4, 32), torch.randn(3, 16, 32)
    dec.mode = "batched"
    a = dec(tokens, patches)
    dec.mode = "loop"
    torch.testing.assert_close(a, dec(tokens, patches), rtol=1e-5, atol=1e-6)


def test_token_drop_path_masks():
    torch.manual_seed(0)
    x = torch.ones(64, 10, 8)
    per_token = TokenDropPath(0.5, per_token=True).train()(x)
    shared = TokenDropPath(0.5, per_token=False).train()(x)
    # shared: every token of a sample kept or dropped together; per token: independent
    assert (shared.amax(1) == shared.amin(1)).all()
    assert not (per_token.amax(1) == per_token.amin(1)).all()
    assert set(per_token.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(TokenDropPath(0.5).eval()(x), x)


# --------------------------------------------------------------------------------------------- counts, backbone
def test_parameter_counts_per_block_match_the_docs():
    m = ConViT(32, 3)  # the CIFAR DyTox: dim 384, 12 heads, patch 4, 5 GPSA SABs + 1 TAB
    assert len(m.encoder.blocks) == 5 and len(m.decoder.blocks) == 1
    assert all(isinstance(b.attn, GPSA) for b in m.encoder.blocks)
    assert n_params(m.encoder.blocks[0]) == 1_773_372
    gpsa = m.encoder.blocks[0].attn
    assert [n_params(x) for x in (gpsa.qk, gpsa.v, gpsa.proj, gpsa.pos_proj)] == [294_912, 147_456, 147_840, 48]
    assert n_params(m.decoder.blocks[0]) == 1_773_312
    assert n_params(m.encoder.patch_embed) == 18_816
    assert m.encoder.pos_embed.numel() == 24_576
    shared = n_params(m.encoder) + n_params(m.decoder)
    assert shared == 10_683_564
    # drop-path linear over the 6 blocks
    rates = [b.drop_path.p for b in m.encoder.blocks] + [m.decoder.blocks[0].drop_path.p]
    assert rates == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08, 0.1])


def test_mhsa_encoder_option_same_count_to_two_decimals():
    m = ConViT(32, 3, sab="mhsa")
    assert not any(isinstance(b.attn, GPSA) for b in m.encoder.blocks)
    shared = n_params(m.encoder) + n_params(m.decoder)
    assert shared != 10_683_564 and int(shared / 1e4) == int(10_683_564 / 1e4)


def test_convit_backbone_from_config_and_bf16():
    cfg, _ = load_config(["replay/digits-b0inc2"], ["model.name=convit", "model.patch_size=2", "model.embed_dim=32",
                                                    "model.num_heads=4", "model.depth=3", "model.local_up_to_layer=2"])
    net = create_backbone(cfg.model, 8, 1)
    x = torch.randn(5, 1, 8, 8)
    assert net(x).shape == (5, 32) and net.num_features == 32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(net(x).float()).all()


def test_convit_options_validation():
    with pytest.raises(ConfigError, match="model.sab"):
        load_config(["replay/digits-b0inc2"], ["model.name=convit", "model.sab=nope"])
    with pytest.raises(ConfigError, match="local_up_to_layer"):
        load_config(["replay/digits-b0inc2"], ["model.name=convit", "model.depth=3", "model.local_up_to_layer=3"])
    with pytest.raises(ConfigError, match="decoder_drop_path"):
        load_config(["replay/digits-b0inc2"], ["model.name=convit", "model.decoder=loop",
                                               "model.decoder_drop_path=shared"])
