"""LPSA against a direct, slow transcription of softmax(lambda_h * q.k/sqrt(d) + v_h . r) and its init facts."""
import math

import pytest
import torch

from vitcl.models.convit import relative_positions
from vitcl.models.lpsa import LPSA


def rel_loops(grid):
    """r[i, j] = (dx, dy, dx^2+dy^2), key j minus query i, patches in raster order, written out."""
    n = grid * grid
    r = torch.zeros(n, n, 3)
    for i in range(n):
        for j in range(n):
            dx = (j % grid) - (i % grid)
            dy = (j // grid) - (i // grid)
            r[i, j] = torch.tensor([dx, dy, dx * dx + dy * dy], dtype=torch.float)
    return r


def lpsa_reference(m: LPSA, x):
    """Per head: concatenate [r_ij, s^h_ij] and apply the head's row of pos_proj (the reference code's form)."""
    B, N, C = x.shape
    H, d = m.num_heads, C // m.num_heads
    grid = int(math.isqrt(N))
    r = rel_loops(grid)
    qk = m.qk(x)
    q, k = qk[..., :C], qk[..., C:]
    v = m.v(x)
    W = m.pos_proj.weight  # (H, 4)
    heads = []
    for h in range(H):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        s = qh @ kh.transpose(1, 2) / math.sqrt(d)  # (B, N, N)
        feats = torch.cat([r.expand(B, N, N, 3), s[..., None]], dim=-1)  # (B, N, N, 4)
        logits = feats @ W[h]
        heads.append(logits.softmax(-1) @ vh)
    return m.proj(torch.cat(heads, dim=-1))


def test_relative_positions_match_loops():
    for grid in (1, 2, 3, 5):
        assert torch.equal(relative_positions(grid), rel_loops(grid))


def test_forward_and_grad_match_transcription():
    torch.manual_seed(0)
    m = LPSA(dim=24, num_heads=6, num_patches=16, lambda_std=0.5)  # a large lambda so content matters
    with torch.no_grad():
        m.v.weight.add_(0.1 * torch.randn_like(m.v.weight))
    x = torch.randn(3, 16, 24, requires_grad=True)
    out = m(x)
    ref = lpsa_reference(m, x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [x, m.pos_proj.weight, m.qk.weight])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, m.pos_proj.weight, m.qk.weight])
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_attention_map_matches_forward():
    torch.manual_seed(1)
    m = LPSA(dim=16, num_heads=4, num_patches=9, lambda_std=1.0)
    x = torch.randn(2, 9, 16)
    A = m.attention_map(x)
    assert A.shape == (2, 4, 9, 9)
    assert torch.allclose(A.sum(-1), torch.ones(2, 4, 9))
    v = m.v(x).reshape(2, 9, 4, 4).transpose(1, 2)
    out = m.proj((A @ v).transpose(1, 2).reshape(2, 9, 16))
    assert torch.allclose(out, m(x), atol=1e-5)


def test_init_facts():
    torch.manual_seed(0)
    m = LPSA(dim=48, num_heads=12, num_patches=64)
    assert m.pos_proj.bias is None and m.pos_proj.weight.shape == (12, 4)
    assert not any("gating" in n for n, _ in m.named_parameters())
    assert m.qk.bias is None and m.v.bias is None and m.proj.bias is not None
    assert torch.equal(m.v.weight, torch.eye(48))
    W = m.pos_proj.weight
    # ConViT local kernel: 3x3 over the first 9 heads, centre 1, head h = h1 + 3*h2 -> (2(h2-1), 2(h1-1), -1)
    for h1 in range(3):
        for h2 in range(3):
            assert W[h1 + 3 * h2, :3].tolist() == [2 * (h2 - 1), 2 * (h1 - 1), -1]
    # heads 9..11 keep a random small v_h; every lambda is small and random (trunc-normal(0.02))
    assert W[9:, :3].abs().max() < 0.2 and W[9:, :3].abs().max() > 0
    assert W[:, 3].abs().max() < 0.2 and W[:, 3].std() > 0
    # at init the attention is nearly positional: head 4 (centre, v=(0,0,-1)) peaks on the query itself
    A = m.attention_map(torch.randn(2, 64, 48))
    assert (A[:, 4].argmax(-1) == torch.arange(64)).all()


def test_lambda_std_is_configurable():
    torch.manual_seed(0)
    m = LPSA(dim=256, num_heads=256, num_patches=4, lambda_std=0.5)
    lam = m.lambdas.detach()
    assert lam.abs().max() <= 2.0  # timm's bounds: +-2 in absolute value, not +-2 std
    assert 0.4 < lam.std() < 0.6


def test_lambda_std_zero_starts_purely_positional():
    """std 0: every lambda_h is 0, so A_h = softmax(v_h . r) whatever the content, and lambda_h still learns."""
    torch.manual_seed(0)
    m = LPSA(dim=16, num_heads=4, num_patches=9, lambda_std=0.0)
    assert torch.equal(m.lambdas, torch.zeros(4))
    x = torch.randn(2, 9, 16, requires_grad=True)
    out = m(x)
    assert torch.allclose(out, lpsa_reference(m, x), atol=1e-5)
    r = rel_loops(3)
    for h in range(4):
        want = (r @ m.pos_proj.weight[h, :3]).softmax(-1)  # (N, N), the same for every sample
        for b in range(2):
            torch.testing.assert_close(m.attention_map(x)[b, h], want)
    (g,) = torch.autograd.grad(out.square().sum(), [m.pos_proj.weight])
    assert g[:, 3].abs().sum() > 0


def test_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        LPSA(dim=8, num_heads=2, num_patches=10)
    with pytest.raises(ValueError, match="square"):
        LPSA(dim=8, num_heads=2)(torch.randn(1, 10, 8))


def test_grid_from_input_and_no_persistent_buffers():
    torch.manual_seed(0)
    m = LPSA(dim=8, num_heads=2)
    assert set(m.state_dict()) == {"qk.weight", "v.weight", "proj.weight", "proj.bias", "pos_proj.weight"}
    x = torch.randn(2, 9, 8)
    assert torch.allclose(m(x), lpsa_reference(m, x), atol=1e-5)


def test_convit_per_layer_attention_keeps_lpsa_init():
    from vitcl.models.convit import GPSA, ConViT

    torch.manual_seed(0)
    m = ConViT(img_size=16, in_chans=1, patch_size=4, embed_dim=32, depth=4, local_up_to_layer=3, num_heads=4,
               sab_layers=["lpsa", "lpsa", "gpsa"], lpsa_lambda_std=0.3)
    kinds = [type(b.attn) for b in m.encoder.blocks]
    assert kinds == [LPSA, LPSA, GPSA]
    for blk in m.encoder.blocks[:2]:
        a = blk.attn
        assert torch.equal(a.v.weight, torch.eye(32))  # ConViT's generic init left LPSA's init alone
        assert a.lambda_std == 0.3 and a.pos_proj.weight[0, :3].tolist() == [-1.0, -1.0, -1.0]
    x = torch.randn(2, 1, 16, 16)
    assert m(x).shape == (2, 32)
    all_lpsa = ConViT(img_size=16, in_chans=1, patch_size=4, embed_dim=32, depth=2, local_up_to_layer=1,
                      num_heads=4, sab="lpsa")
    assert isinstance(all_lpsa.encoder.blocks[0].attn, LPSA)


def test_convit_sab_layers_config_errors():
    from vitcl.errors import ConfigError
    from vitcl.runconfig import load_config

    base = ["model.name=convit", "model.local_up_to_layer=2", "model.depth=3"]
    cfg, _ = load_config(["replay/digits-b0inc2"], base + ["model.sab_layers=[lpsa,mhsa]"])
    assert cfg.model.sab_layers == ["lpsa", "mhsa"]
    with pytest.raises(ConfigError, match=r"model.sab_layers\[1\]: unknown 'foo'"):
        load_config(["replay/digits-b0inc2"], base + ["model.sab_layers=[lpsa,foo]"])
    with pytest.raises(ConfigError, match="model.sab_layers: 1 names for 2 SABs"):
        load_config(["replay/digits-b0inc2"], base + ["model.sab_layers=[lpsa]"])


def test_class_attention_map_matches_forward():
    from vitcl.models.convit import ClassAttention

    torch.manual_seed(0)
    ca = ClassAttention(16, 2)
    tokens, patches = torch.randn(3, 2, 16), torch.randn(3, 9, 16)
    A = ca.attention_map(tokens, patches)
    assert A.shape == (3, 2, 2, 11) and A[:, :, 0, 1].abs().max() == 0 and A[:, :, 1, 0].abs().max() == 0
    v = torch.cat([ca.v(tokens), ca.v(patches)], 1).reshape(3, 11, 2, 8).transpose(1, 2)
    out = ca.proj((A @ v).transpose(1, 2).reshape(3, 2, 16))
    assert torch.allclose(out, ca(tokens, patches), atol=1e-5)
