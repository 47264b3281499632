"""Swin against a direct transcription of the original window attention; pretrained weights from the timm,
torchvision, original-Swin and ViT .npz layouts (written here from a model, read back into a fresh one)."""
import numpy as np
import pytest
import torch

from vitcl.errors import ConfigError
from vitcl.models.pretrained import load_pretrained
from vitcl.models.resnet import ResNet
from vitcl.models.swin import SwinBlock, SwinTransformer
from vitcl.models.vit import VisionTransformer


def slow_swin_attention(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """The original Swin block's attention branch, window by window with an explicit softmax."""
    B, H, W, C = x.shape
    ws, s, attn = block.window_size, block.shift_size, block.attn
    heads, hd = attn.num_heads, C // attn.num_heads
    y = torch.roll(block.norm1(x), (-s, -s), (1, 2)) if s else block.norm1(x)
    region = torch.zeros(H, W)
    if s:
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                region[hs, wsl] = cnt
                cnt += 1
    table, out = attn.relative_position_bias_table, torch.zeros_like(y)
    for b in range(B):
        for wi in range(H // ws):
            for wj in range(W // ws):
                tok = y[b, wi * ws:(wi + 1) * ws, wj * ws:(wj + 1) * ws].reshape(-1, C)
                reg = region[wi * ws:(wi + 1) * ws, wj * ws:(wj + 1) * ws].reshape(-1)
                coords = [(i, j) for i in range(ws) for j in range(ws)]
                q, k, v = attn.qkv(tok).reshape(-1, 3, heads, hd).permute(1, 2, 0, 3)
                logits = q @ k.transpose(-1, -2) * hd**-0.5
                for m, (a1, b1) in enumerate(coords):
                    for n, (a2, b2) in enumerate(coords):
                        logits[:, m, n] += table[(a1 - a2 + ws - 1) * (2 * ws - 1) + (b1 - b2 + ws - 1)]
                        if reg[m] != reg[n]:
                            logits[:, m, n] += -100.0
                o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(-1, C)
                out[b, wi * ws:(wi + 1) * ws, wj * ws:(wj + 1) * ws] = attn.proj(o).reshape(ws, ws, C)
    return torch.roll(out, (s, s), (1, 2)) if s else out


@pytest.mark.parametrize("shift", [False, True])
@torch.no_grad()
def test_swin_window_attention_matches_transcription(shift):
    torch.manual_seed(0)
    block = SwinBlock(8, 2, (8, 8), window_size=4, shift=shift).eval()
    torch.nn.init.normal_(block.attn.relative_position_bias_table, std=0.5)
    x = torch.randn(2, 8, 8, 8)
    want = x + slow_swin_attention(block, x)
    want = want + block.mlp(block.norm2(want))
    torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_swin_pads_maps_that_are_not_window_multiples():
    m = SwinTransformer(32, 3, patch_size=4, embed_dim=12, depths=(2, 2), num_heads=(2, 4), window_size=3).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 24)  # 8x8 and 4x4 maps, window 3


def small_vit(img=8, pool="token"):
    return VisionTransformer(img, 3, patch_size=4, embed_dim=8, depth=2, num_heads=2, pool=pool).eval()


def to_npz(vit: VisionTransformer, path):
    """Our ViT in the original release's layout (JAX names, HWIO / (in, heads, head_dim) kernels)."""
    sd, D, H = vit.state_dict(), vit.num_features, vit.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0), "embedding/bias": sd["patch_embed.proj.bias"],
         "cls": sd["cls_token"], "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": torch.zeros(D, 5), "head/bias": torch.zeros(5)}
    for i in range(len(vit.blocks)):
        p, q = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[q + "norm1.weight"], sd[q + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[q + "norm2.weight"], sd[q + "norm2.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = sd[q + "attn.qkv.weight"][j * D:(j + 1) * D].T.reshape(D, H, D // H)
            w[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = sd[q + "attn.qkv.bias"][j * D:(j + 1) * D].reshape(H, D // H)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[q + "attn.proj.weight"].T.reshape(H, D // H, D)
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[q + "attn.proj.bias"]
        for j, n in ((0, "fc1"), (1, "fc2")):
            w[p + f"MlpBlock_3/Dense_{j}/kernel"] = sd[q + f"mlp.{n}.weight"].T
            w[p + f"MlpBlock_3/Dense_{j}/bias"] = sd[q + f"mlp.{n}.bias"]
    np.savez(path, **{k: v.numpy() for k, v in w.items()})


@torch.no_grad()
def test_vit_npz_loads_and_resamples_position_embeddings(tmp_path):
    torch.manual_seed(0)
    src = small_vit()
    to_npz(src, tmp_path / "ViT-B_16.npz")
    dst = small_vit()
    load_pretrained(dst, str(tmp_path / "ViT-B_16.npz"))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(dst(x), src(x))
    bigger = small_vit(img=16)  # 4x4 patches from a 2x2 grid: bicubic resampling, class token kept
    load_pretrained(bigger, str(tmp_path / "ViT-B_16.npz"))
    torch.testing.assert_close(bigger.pos_embed[:, 0], src.pos_embed[:, 0])
    assert bigger(torch.randn(1, 3, 16, 16)).shape == (1, 8)


@torch.no_grad()
def test_vit_torchvision_names(tmp_path):
    torch.manual_seed(0)
    src = small_vit()
    sd = src.state_dict()
    tv = {"conv_proj.weight": sd["patch_embed.proj.weight"], "conv_proj.bias": sd["patch_embed.proj.bias"],
          "class_token": sd["cls_token"], "encoder.pos_embedding": sd["pos_embed"],
          "encoder.ln.weight": sd["norm.weight"], "encoder.ln.bias": sd["norm.bias"],
          "heads.head.weight": torch.zeros(3, 8), "heads.head.bias": torch.zeros(3)}
    for i in range(2):
        p, q = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        for a, b in (("ln_1", "norm1"), ("ln_2", "norm2"), ("self_attention.out_proj", "attn.proj"),
                     ("mlp.0", "mlp.fc1"), ("mlp.3", "mlp.fc2")):
            tv[p + a + ".weight"], tv[p + a + ".bias"] = sd[q + b + ".weight"], sd[q + b + ".bias"]
        tv[p + "self_attention.in_proj_weight"] = sd[q + "attn.qkv.weight"]
        tv[p + "self_attention.in_proj_bias"] = sd[q + "attn.qkv.bias"]
    torch.save(tv, tmp_path / "vit_b_16.pth")
    dst = small_vit()
    load_pretrained(dst, str(tmp_path / "vit_b_16.pth"))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(dst(x), src(x))


@torch.no_grad()
def test_resnet_torchvision_weights_into_bn_without_affine(tmp_path):
    torch.manual_seed(0)
    src = ResNet([1, 1], [8, 16], 3, "imagenet")
    for m in src.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    sd = dict(src.state_dict(), **{"fc.weight": torch.zeros(10, 16), "fc.bias": torch.zeros(10)})
    torch.save(sd, tmp_path / "resnet18-f37072fd.pth")
    dst = ResNet([1, 1], [8, 16], 3, "imagenet", bn_affine=False)
    info = load_pretrained(dst, str(tmp_path / "resnet18-f37072fd.pth"))
    assert "bn1.weight" in info["skipped"] and not info["missing"]
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight)
    torch.testing.assert_close(dst.bn1.running_mean, src.bn1.running_mean)


@torch.no_grad()
def test_swin_original_and_torchvision_layouts(tmp_path):
    torch.manual_seed(0)
    src = SwinTransformer(32, 3, patch_size=4, embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=4).eval()
    x = torch.randn(2, 3, 32, 32)
    sd = src.state_dict()
    # the original release: patch merging ends stage i (layers.i.downsample), buffers and a head stored
    orig = {}
    for k, v in sd.items():
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample.", f"layers.{i - 1}.downsample.")
        orig[k] = v
    orig["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    orig["head.weight"], orig["head.bias"] = torch.zeros(5, 16), torch.zeros(5)
    torch.save({"model": orig}, tmp_path / "swin_orig.pth")
    dst = SwinTransformer(32, 3, patch_size=4, embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=4).eval()
    load_pretrained(dst, str(tmp_path / "swin_orig.pth"))
    torch.testing.assert_close(dst(x), src(x))
    # torchvision: features.0 = patch embedding, features.2i+1 = stage i, features.2i = merging into stage i
    tv = {}
    for k, v in sd.items():
        if k.startswith("patch_embed."):
            k = k.replace("patch_embed.proj.", "features.0.0.").replace("patch_embed.norm.", "features.0.2.")
        elif k.startswith("layers."):
            parts = k.split(".")
            i = int(parts[1])
            if parts[2] == "downsample":
                k = f"features.{2 * i}." + ".".join(parts[3:])
            else:
                k = f"features.{2 * i + 1}." + ".".join(parts[3:]).replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
        tv[k] = v
    torch.save(tv, tmp_path / "swin_tv.pth")
    dst = SwinTransformer(32, 3, patch_size=4, embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=4).eval()
    load_pretrained(dst, str(tmp_path / "swin_tv.pth"))
    torch.testing.assert_close(dst(x), src(x))


def test_missing_or_foreign_file_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="storage.googleapis.com/vit_models") as err:
        load_pretrained(small_vit(), str(tmp_path / "ViT-B_16.npz"))
    assert "\n" not in str(err.value) and "model.pretrained" in str(err.value)
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="no tensor"):
        load_pretrained(small_vit(), str(tmp_path / "other.pth"))


@torch.no_grad()
def test_checkpoint_with_a_namespace_loads_and_garbage_is_one_line(tmp_path):
    import argparse

    torch.manual_seed(0)
    src = small_vit()
    # DeiT's and DyTox's training scripts save {"model": ..., "args": Namespace(...)}
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=5e-4)}, tmp_path / "deit.pth")
    dst = small_vit()
    load_pretrained(dst, str(tmp_path / "deit.pth"))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(dst(x), src(x))
    (tmp_path / "bad.pth").write_bytes(b"garbage, not a checkpoint\n")
    with pytest.raises(ConfigError, match=r"bad\.pth: not a readable torch checkpoint \(weights-only load: ") as err:
        load_pretrained(small_vit(), str(tmp_path / "bad.pth"))
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


@torch.no_grad()
def test_a_namespace_loads_without_safe_globals(tmp_path, monkeypatch):
    """torch 2.4 has add_safe_globals but no safe_globals context: the checkpoint loads all the same."""
    import argparse

    added = []
    monkeypatch.delattr(torch.serialization, "safe_globals")
    original = torch.serialization.add_safe_globals
    monkeypatch.setattr(torch.serialization, "add_safe_globals", lambda g: (added.extend(g), original(g)))
    before = torch.serialization.get_safe_globals()
    src = small_vit()
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=5e-4)}, tmp_path / "deit.pth")
    dst = small_vit()
    try:
        load_pretrained(dst, str(tmp_path / "deit.pth"))
    finally:  # the process-wide allowance is this test's only: the other tests load under safe_globals
        torch.serialization.clear_safe_globals()
        original(before)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(dst(x), src(x))
    assert added == [argparse.Namespace]


def test_timm_backbones_are_an_optional_extra():
    import importlib.util

    from vitcl.data.build import build_scenario
    from vitcl.methods import METHODS
    from vitcl.runconfig import load_config

    cfg, _ = load_config(["finetune/digits-b0inc2"], ["model.name=timm", "model.arch=vit_tiny_patch16_224",
                                                       "data.image_size=32", "method.name=rkr", "data.setting=task-il"])
    scenario = build_scenario(cfg.data, shapes_only=True)
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(ConfigError, match=r"pip install 'vitcl\[timm\]'"):
            METHODS.get("rkr")(cfg, scenario, torch.device("cpu"))
        return
    m = METHODS.get("rkr")(cfg, scenario, torch.device("cpu"))  # pragma: no cover - only with the extra
    wrapped = [n for n, mod in m.model.backbone.named_modules() if type(mod).__name__ == "TaskLayer"]
    assert "blocks.0.attn.qkv" in wrapped and len(wrapped) == 4 * 12


def test_vit_checkpoint_into_dytox_encoder(tmp_path):
    """A ViT's blocks become ConViT's SABs (plain attention), its patch and position embedding the encoder's: the
    encoder computes what the ViT's blocks compute on the patch tokens alone."""
    from vitcl.models.convit import ConViT

    torch.manual_seed(0)
    vit = VisionTransformer(16, 1, patch_size=4, embed_dim=16, depth=2, num_heads=2, pool="token").eval()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    convit = ConViT(16, 1, patch_size=4, embed_dim=16, depth=3, local_up_to_layer=2, num_heads=2, qkv_bias=True,
                    sab="mhsa", drop_path=0.0).eval()
    report = load_pretrained(convit, str(tmp_path / "vit.pth"))
    assert not [k for k in report["missing"] if k.startswith("encoder.")]
    assert report["skipped"] == []
    torch.testing.assert_close(convit.cls_token, vit.cls_token)
    x = torch.randn(2, 1, 16, 16)
    tokens = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    torch.testing.assert_close(convit.forward_features(x), vit.blocks(tokens))
    # its own checkpoint goes back in unchanged
    assert set(convit.checkpoint_filter_fn(convit.state_dict())) == set(convit.state_dict())
