"""`model.pretrained: hf_hub:timm/<name>` through a fake Hugging Face cache built in tmp_path (the hub's layout:
models--OWNER--NAME/refs/main + snapshots/<rev>/<file>), offline: nothing is downloaded. Also that timm's in21k
ViT-B/16 checkpoint names load into our ViT-B/16, all but the 21843-class head."""
import sys

import pytest
import torch

from torchvision_standin import timm_importable
from vitcl.errors import ConfigError
from vitcl.models import create_backbone
from vitcl.models import pretrained as pre
from vitcl.models.timm_backbone import TimmOptions
from vitcl.models.vit import VisionTransformer, ViTOptions

pytest.importorskip("huggingface_hub")
safetensors_torch = pytest.importorskip("safetensors.torch")

TINY = ViTOptions(patch_size=4, embed_dim=16, depth=2, num_heads=2)
REV = "0123456789abcdef0123456789abcdef01234567"
WHY = timm_importable()


def fake_cache(root, repo_id: str, files: dict) -> None:
    """Write `files` ({name: state dict}) as the cached snapshot of `repo_id` under root/hub."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    for name, sd in files.items():
        sd = {k: v.contiguous() for k, v in sd.items()}
        if name.endswith(".safetensors"):
            safetensors_torch.save_file(sd, str(snap / name))
        else:
            torch.save(sd, snap / name)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def timm_named(model: torch.nn.Module, classes: int) -> dict:
    """A timm checkpoint of `model`: its own names (ours are timm's) plus timm's classifier."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    d = sd["norm.weight"].shape[0]
    sd["head.weight"], sd["head.bias"] = torch.randn(classes, d), torch.randn(classes)
    return sd


@torch.no_grad()
@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_cached_checkpoint_loads_offline_into_our_vit(hf_home, filename):
    torch.manual_seed(0)
    src = VisionTransformer(16, 3, TINY)
    fake_cache(hf_home, "timm/tiny_vit.test", {filename: timm_named(src, 10)})
    dst = create_backbone(ViTOptions(**{**TINY.__dict__, "pretrained": "hf_hub:timm/tiny_vit.test"}), 16, 3)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(dst(x), src(x))


def test_hub_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert pre.hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert pre.hub_cache() == tmp_path / "elsewhere"


@torch.no_grad()
def test_hf_hub_cache_variable_is_honoured(tmp_path, monkeypatch):
    torch.manual_seed(1)
    src = VisionTransformer(16, 3, TINY)
    fake_cache(tmp_path, "timm/other", {"model.safetensors": timm_named(src, 5)})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "not-here"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dst = VisionTransformer(16, 3, TINY)
    out = pre.load_pretrained(dst, "hf_hub:timm/other")
    assert out["skipped"] == [] and out["missing"] == []  # the head was dropped before matching
    torch.testing.assert_close(dst.pos_embed, src.pos_embed)


def test_not_cached_offline_is_a_one_line_error_naming_repo_and_hf_home(hf_home):
    with pytest.raises(ConfigError) as err:
        pre.load_pretrained(VisionTransformer(16, 3, TINY), "hf_hub:timm/vit_base_patch16_224.augreg_in21k")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.pretrained:")
    assert "timm/vit_base_patch16_224.augreg_in21k" in msg and f"HF_HOME={hf_home}" in msg
    assert "HF_HUB_OFFLINE" in msg


def test_download_failure_falls_back_to_the_cache(hf_home, monkeypatch):
    """Online (HF_HUB_OFFLINE unset) a failed download is followed by a cache-only try."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []
    real = huggingface_hub.hf_hub_download

    def flaky(repo_id, filename, **kw):
        calls.append((filename, kw["local_files_only"]))
        if not kw["local_files_only"]:
            raise OSError("network unreachable")
        return real(repo_id, filename, **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", flaky)
    fake_cache(hf_home, "timm/cached", {"model.safetensors": timm_named(VisionTransformer(16, 3, TINY), 3)})
    path = pre.resolve_hub("hf_hub:timm/cached")
    assert path.name == "model.safetensors" and path.is_file()
    assert calls == [("model.safetensors", False), ("pytorch_model.bin", False), ("model.safetensors", True)]


def test_unreachable_hub_is_asked_once_before_the_cache(hf_home, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def unreachable(repo_id, filename, **kw):
        calls.append((filename, kw["local_files_only"]))
        raise LocalEntryNotFoundError("cannot reach the hub and the file is not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(ConfigError, match="could not be downloaded"):
        pre.resolve_hub("hf_hub:timm/absent")
    assert calls == [("model.safetensors", False), ("model.safetensors", True), ("pytorch_model.bin", True)]


def test_missing_huggingface_hub_and_bad_spec_are_config_errors(hf_home, monkeypatch):
    with pytest.raises(ConfigError, match="expected hf_hub:OWNER/NAME"):
        pre.resolve_hub("hf_hub:vit_base_patch16_224")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"huggingface_hub package: pip install 'vitcl\[hub\]'"):
        pre.resolve_hub("hf_hub:timm/x")


def vit_b16_meta() -> VisionTransformer:
    with torch.device("meta"):
        return VisionTransformer(224, 3, ViTOptions(patch_size=16, embed_dim=768, depth=12, num_heads=12))


def load_names(model, sd, tmp_path, monkeypatch) -> dict:
    """load_pretrained's matching on a state dict of meta tensors (shapes only), as if read from a file."""
    placeholder = tmp_path / "vit_base_patch16_224.augreg_in21k.safetensors"
    placeholder.write_bytes(b"")
    monkeypatch.setattr(pre, "read_file", lambda path: dict(sd))
    return pre.load_pretrained(model, str(placeholder))


def test_timm_in21k_vit_b16_names_load_into_our_vit_b16(tmp_path, monkeypatch):
    ours = vit_b16_meta()
    sd = {k: torch.empty(v.shape, device="meta") for k, v in ours.state_dict().items()}
    sd["head.weight"] = torch.empty(21843, 768, device="meta")  # timm's in21k classifier
    sd["head.bias"] = torch.empty(21843, device="meta")
    out = load_names(ours, sd, tmp_path, monkeypatch)
    assert out["missing"] == [] and out["skipped"] == []
    assert set(out["loaded"]) == set(ours.state_dict()) and len(out["loaded"]) == 4 + 12 * 12 + 2


@pytest.mark.skipif(WHY is not None, reason=WHY or "")
def test_timms_own_vit_b16_in21k_state_dict_names_match_ours(tmp_path, monkeypatch):
    import timm

    with torch.device("meta"):
        theirs = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=21843)
    out = load_names(vit_b16_meta(), theirs.state_dict(), tmp_path, monkeypatch)
    assert out["missing"] == [] and out["skipped"] == []  # head.* dropped, all else by name and shape
    assert set(theirs.state_dict()) - set(out["loaded"]) == {"head.weight", "head.bias"}


@torch.no_grad()
@pytest.mark.skipif(WHY is not None, reason=WHY or "")
def test_timm_backbone_takes_hf_hub_and_resamples_with_timms_filter(hf_home):
    import timm

    torch.manual_seed(0)
    tiny = {"embed_dim": 16, "depth": 2, "num_heads": 2, "patch_size": 4}
    src = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=7, img_size=16, **tiny)
    fake_cache(hf_home, "timm/tiny_timm_vit", {"model.safetensors": src.state_dict()})
    opts = TimmOptions(arch="vit_base_patch16_224", kwargs=tiny, pretrained="hf_hub:timm/tiny_timm_vit")
    same = create_backbone(opts, 16, 3)
    torch.testing.assert_close(same.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    bigger = create_backbone(opts, 24, 3)  # a 6x6 grid from the checkpoint's 4x4: timm's checkpoint_filter_fn
    assert bigger.pos_embed.shape == (1, 37, 16)
    torch.testing.assert_close(bigger.pos_embed[:, 0], src.pos_embed[:, 0])
    torch.testing.assert_close(bigger.patch_embed.proj.weight, src.patch_embed.proj.weight)
