import math

import pytest
import torch
from scipy import stats

from vitcl.models import GrowingHead, create_backbone
from vitcl.models.layers import Attention, trunc_normal_
from vitcl.models.resnet import ResNet18Options, ResNet32Options
from vitcl.models.vit import VisionTransformer, ViTOptions


def attention_reference(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, concatenated, projected: written out directly."""
    B, N, C = x.shape
    H, d = attn.num_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    heads = []
    for h in range(H):
        s = slice(h * d, (h + 1) * d)
        a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), dim=-1)
        heads.append(a @ v[..., s])
    return torch.cat(heads, -1) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("bias", [True, False])
def test_sdpa_attention_matches_direct_formula(bias):
    torch.manual_seed(0)
    attn = Attention(24, 3, qkv_bias=bias).double().eval()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    assert torch.allclose(attn(x), attention_reference(attn, x), atol=1e-10)
    maps = attn.attention_map(x)
    assert maps.shape == (2, 3, 7, 7) and torch.allclose(maps.sum(-1), torch.ones(2, 3, 7, dtype=torch.float64))


def test_vit_shapes_and_pooling():
    for pool, tokens in (("token", 17), ("mean", 16)):
        vit = VisionTransformer(img_size=16, in_chans=1, patch_size=4, embed_dim=32, depth=2, num_heads=4, pool=pool)
        x = torch.randn(3, 1, 16, 16)
        feats = vit.forward_features(x)
        assert feats.shape == (3, tokens, 32) and vit(x).shape == (3, 32)
        if pool == "mean":
            assert torch.allclose(vit.forward_head(feats), feats.mean(1))


def test_vit_init_is_timm_style():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, in_chans=3, embed_dim=192, depth=2, num_heads=3)
    w = vit.blocks[0].mlp.fc1.weight
    # timm's bounds are +-2 in absolute value: at std 0.02 the normal is in effect untruncated (not cut at 0.04)
    assert abs(w.std().item() - 0.02) < 0.0003 and w.abs().max() > 0.04
    assert torch.count_nonzero(vit.blocks[0].attn.proj.bias) == 0


def test_trunc_normal_std_002_is_untruncated_and_finite():
    torch.manual_seed(0)
    t = trunc_normal_(torch.empty(1_000_000), std=0.02)
    assert torch.isfinite(t).all() and t.abs().max() <= 2.0
    # sd of the sample sd is 0.02 / sqrt(2n) = 1.4e-5; a cut at +-2 std would give 0.0176
    assert abs(t.std().item() - 0.02) < 1e-4
    assert (t.abs() > 0.04).float().mean().item() == pytest.approx(0.0455, abs=0.002)  # P(|z| > 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_trunc_normal_is_finite_where_the_cdf_rounds_to_0_and_1(dtype):
    torch.manual_seed(0)
    t = trunc_normal_(torch.empty(200_000, dtype=dtype), std=1e-3)  # Phi(-2000) is 0 in double
    assert torch.isfinite(t).all() and t.float().std().item() == pytest.approx(1e-3, rel=0.02)


@pytest.mark.parametrize("mean,std,a,b", [(0.0, 0.02, -2.0, 2.0), (0.0, 1.0, -2.0, 2.0),
                                          (0.3, 0.5, -0.2, 1.5), (0.0, 0.02, -0.01, 0.03)])
def test_trunc_normal_matches_torch_rejection_sampler(mean, std, a, b):
    """Same distribution as torch.nn.init.trunc_normal_ with the same (absolute) bounds: two-sample KS test."""
    torch.manual_seed(0)
    ours = trunc_normal_(torch.empty(50_000), std=std, mean=mean, a=a, b=b)
    ref = torch.nn.init.trunc_normal_(torch.empty(50_000), mean=mean, std=std, a=a, b=b)
    assert ours.min() >= a and ours.max() <= b
    assert stats.ks_2samp(ours.numpy(), ref.numpy()).pvalue > 1e-3
    exact = stats.truncnorm((a - mean) / std, (b - mean) / std, loc=mean, scale=std)
    assert stats.kstest(ours.numpy().astype("float64"), exact.cdf).pvalue > 1e-3


def test_trunc_normal_rejects_empty_interval():
    with pytest.raises(ValueError, match="a < b"):
        trunc_normal_(torch.empty(3), a=1.0, b=1.0)


def test_resnet_parameter_counts():
    r18 = create_backbone(ResNet18Options(), 32, 3)
    r32 = create_backbone(ResNet32Options(), 32, 3)
    # torchvision's resnet18 has 11,689,512 with its 1000-class fc (513,000): 11,176,512 without it;
    # the CIFAR stem's 3x3 conv has 1,728 weights instead of 9,408.
    assert sum(p.numel() for p in r18.parameters()) == 11_176_512 - 9_408 + 1_728
    # ResNet-32 (He et al. 2016): 0.46M parameters with its 10-class head (650)
    assert sum(p.numel() for p in r32.parameters()) + 650 == 464_154
    assert r18(torch.randn(2, 3, 32, 32)).shape == (2, 512) and r32(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_imagenet_stem_resnet18_matches_torchvision_count():
    r18 = create_backbone(ResNet18Options(stem="imagenet"), 224, 3)
    assert sum(p.numel() for p in r18.parameters()) == 11_176_512


def test_growing_head_concatenates_task_heads():
    head = GrowingHead(8)
    head.add_task(2)
    head.add_task(3)
    x = torch.randn(4, 8)
    out = head(x)
    assert out.shape == (4, 5) and head.num_classes == 5
    assert torch.equal(out[:, 2:], head(x, task=1))


def test_model_options_reject_unknown_keys():
    from vitcl.config import build
    from vitcl.errors import ConfigError

    with pytest.raises(ConfigError, match="model.depht: unknown key"):
        build(ViTOptions, {"name": "vit", "depht": 2}, "model")
