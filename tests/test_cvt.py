import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vitcl.cli import main, param_rows
from vitcl.errors import ConfigError
from vitcl.models import create_backbone
from vitcl.models.cvt import ConvAttention, CvT
from vitcl.runconfig import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "vitcl" / "configs" / "base"
EMBED = dict(patch_sizes=[3, 3, 3], patch_strides=[2, 2, 2], patch_paddings=[1, 1, 1])
TINY = dict(dims=[8, 16, 24], depths=[1, 1, 2], heads=[1, 2, 3], **EMBED)


@pytest.mark.parametrize("size, grid", [(32, 4), (28, 4)])  # 32 -> 16 -> 8 -> 4; 28 -> 14 -> 7 -> 4
@pytest.mark.parametrize("pool, cls_stage", [("token", -1), ("token", 0), ("mean", -1)])
def test_output_shapes(size, grid, pool, cls_stage):
    model = CvT(size, 3, **TINY, pool=pool, cls_stage=cls_stage).eval()
    x = torch.randn(2, 3, size, size)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, grid * grid + (pool == "token"), 24)
    assert model(x).shape == (2, model.num_features) == (2, 24)
    want = tokens[:, 0] if pool == "token" else tokens.mean(1)
    torch.testing.assert_close(model(x), want)


def test_the_papers_cvt_13_count():
    model = CvT(224, 3)  # the defaults: CvT-13, 20M parameters with its 1000-class head in the paper
    count = sum(p.numel() for p in model.parameters()) + model.num_features * 1000 + 1000
    assert abs(count - 20.0e6) / 20.0e6 < 0.01, count


# --------------------------------------------------------------------------------------------- slow transcriptions
def slow_depthwise_bn(x, weight, stride, bn):
    """(C, H, W) -> (C, H', W'): each channel convolved with its own 3x3 kernel (zero padding 1), then the eval
    BatchNorm y = (z - mean) / sqrt(var + eps) * gamma + beta."""
    C, H, W = x.shape
    xp = torch.zeros(C, H + 2, W + 2)
    xp[:, 1:-1, 1:-1] = x
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    out = torch.zeros(C, Ho, Wo)
    for c in range(C):
        for i in range(Ho):
            for j in range(Wo):
                out[c, i, j] = sum(weight[c, 0, a, b] * xp[c, i * stride + a, j * stride + b]
                                   for a in range(3) for b in range(3))
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (out - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]


def randomise_bn(attn):
    for seq in (attn.conv_q, attn.conv_k, attn.conv_v):
        bn = seq[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()


@pytest.mark.parametrize("n_cls", [0, 1])
def test_convolutional_projection_matches_a_transcription(n_cls):
    torch.manual_seed(0)
    C, h, w = 6, 5, 4
    attn = ConvAttention(C, 2, kv_stride=2).eval()
    randomise_bn(attn)
    x = torch.randn(2, n_cls + h * w, C)
    q, k, v = attn.project(x, h, w, n_cls)
    assert q.shape == (2, n_cls + h * w, C) and k.shape == v.shape == (2, n_cls + 3 * 2, C)
    with torch.no_grad():
        for b in range(2):
            grid = x[b, n_cls:].T.reshape(C, h, w)  # token t = (row t // w, column t % w)
            for got, conv, linear, stride in ((q, attn.conv_q, attn.proj_q, 1), (k, attn.conv_k, attn.proj_k, 2),
                                              (v, attn.conv_v, attn.proj_v, 2)):
                mapped = slow_depthwise_bn(grid, conv[0].weight, stride, conv[1]).reshape(C, -1).T
                tokens = torch.cat([x[b, :n_cls], mapped])  # the class token skips the convolution
                torch.testing.assert_close(got[b], tokens @ linear.weight.T + linear.bias, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_scale", ["dim", "head"])
def test_attention_matches_a_transcription(attn_scale):
    torch.manual_seed(1)
    C, H, h, w = 8, 2, 4, 4
    attn = ConvAttention(C, H, attn_scale=attn_scale).eval()
    randomise_bn(attn)
    x = torch.randn(1, 1 + h * w, C)
    with torch.no_grad():
        q, k, v = (t[0] for t in attn.project(x, h, w, 1))
        d = C // H
        scale = 1 / math.sqrt(C if attn_scale == "dim" else d)  # the official code divides by the stage width
        heads = [torch.softmax(q[:, i * d:(i + 1) * d] @ k[:, i * d:(i + 1) * d].T * scale, -1)
                 @ v[:, i * d:(i + 1) * d] for i in range(H)]
        want = torch.cat(heads, 1) @ attn.proj.weight.T + attn.proj.bias
        torch.testing.assert_close(attn(x, h, w, 1)[0], want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- behaviour
def test_stochastic_depth_is_off_in_eval():
    torch.manual_seed(0)
    dropping = CvT(32, 3, **TINY, drop_path=[0.5, 0.5, 0.5])
    plain = CvT(32, 3, **TINY, drop_path=[0.0, 0.0, 0.0])
    plain.load_state_dict(dropping.state_dict())
    x = torch.randn(4, 3, 32, 32)
    dropping.eval(), plain.eval()
    torch.testing.assert_close(dropping(x), plain(x))
    dropping.train(), plain.train()
    torch.testing.assert_close(plain(x), plain(x))  # no randomness left without drop-path
    assert not torch.allclose(dropping(x), dropping(x))  # ... and drop-path draws in training


def test_initialisation_follows_the_official_scheme():
    torch.manual_seed(0)
    model = CvT(32, 3, dims=[32, 64, 128], depths=[1, 2, 3], heads=[1, 2, 4], **EMBED)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 0.001
    assert all(m.bias is None or not m.bias.any() for m in linears)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all((m.weight == 1).all() and not m.bias.any() for m in bns)



def test_gradients_reach_every_parameter_with_an_early_class_token():
    model = create_backbone(CvT.Options(**TINY, cls_stage=0), 28, 1)
    torch.manual_seed(0)
    # every output token (in the last block only the patch tokens' outputs depend on conv_q), against random
    # weights (a plain sum after LayerNorm has zero gradient)
    tokens = model.forward_features(torch.randn(2, 1, 28, 28))
    (tokens * torch.randn_like(tokens)).sum().backward()
    assert len(model.cls_maps) == 2
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("override, key", [
    ("model.depths=[1,2]", "model.depths"), ("model.heads=[1,3,5]", "model.heads"),
    ("model.cls_stage=3", "model.cls_stage"), ("model.drop_path=[0,0,1.0]", "model.drop_path"),
    ("model.kv_stride=0", "model.kv_stride"), ("model.pool=cls", "model.pool"),
])
def test_bad_options_name_their_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(["er/digits-b0inc2"], ["model.name=cvt", override])


# --------------------------------------------------------------------------------------------- configs and a run
@pytest.mark.parametrize("config, preset, near", [
    ("cvt-cifar", "er/cifar100-5tasks-m200", None),
    ("cvt-cifar-8.9m", "er/cifar100-5tasks-m200", 8.9e6),  # LVT's count
    ("cvt-fmnist-0.7m", "er/fashion-mnist-b0inc2", 701_178),  # the width-16 ResNet-18 of the benchmark
])
def test_the_counts_in_the_configs_comments(config, preset, near):
    path = CONFIGS / f"{config}.yaml"
    comment = " ".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    (stated,) = re.findall(r"(\d{1,3}(?:,\d{3})+) (?:parameters|at 32 px)", comment)
    cfg, _ = load_config([preset, str(path)])
    rows, _ = param_rows(cfg)
    assert rows[-1]["total"] == int(stated.replace(",", ""))
    if near is not None:
        assert abs(rows[-1]["total"] - near) / near < 0.05


def test_a_tiny_er_run_trains_a_cvt_through_the_cli(tmp_path):
    rc = main(["run", "er/digits-b0inc2", "model.name=cvt", "model.dims=[16,32,32]", "model.depths=[1,1,1]",
               "model.heads=[1,2,2]", "model.patch_sizes=[3,3,3]", "model.patch_strides=[1,2,2]",
               "model.patch_paddings=[1,1,1]", "data.increment=[4,3,3]", "data.class_order=null",
               "data.train_per_class=40", "data.test_per_class=20", "train.epochs=4", "train.lr=0.05",
               "memory.size=40", f"run.out_dir={tmp_path}", "run.name=r", "run.threads=1", "-q"])
    assert rc == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    acc = res["class_il"]["acc_matrix"]
    assert len(acc) == 3
    assert acc[0][0] > 40  # 4 classes: chance is 25
    cfg = (tmp_path / "r" / "config.yaml").read_text()
    assert "name: cvt" in cfg


def test_the_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = CvT(16, 1, **TINY)
    head = torch.nn.Linear(model.num_features, 4)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
    x, y = torch.randn(16, 1, 16, 16), torch.arange(16) % 4
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(head(model(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
