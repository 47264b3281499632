"""Locality analyses: the non-locality formula on known maps, collection from real models, the run hook and CLI."""
import json
import math

import torch

from vitcl.eval.locality import collect_attention, covariance_spectrum, heldout_indices, nonlocality, patch_block
from vitcl.models.layers import Attention, Block, PatchEmbed


def mean_patch_distance(grid):
    pts = [(r, c) for r in range(grid) for c in range(grid)]
    return sum(math.hypot(a[0] - b[0], a[1] - b[1]) for a in pts for b in pts) / len(pts) ** 2


def test_identity_attention_is_local():
    N = 16
    attn = torch.eye(N).expand(2, 3, N, N)
    assert torch.allclose(nonlocality(attn), torch.zeros(3))


def test_uniform_attention_is_mean_distance():
    for grid in (2, 3, 4):
        N = grid * grid
        attn = torch.full((5, 2, N, N), 1.0 / N)
        d = nonlocality(attn)
        assert torch.allclose(d, torch.full((2,), mean_patch_distance(grid)), atol=1e-6)


def test_neighbour_attention_and_batch_average():
    # every query looks only at its right neighbour (distance 1) in one sample and itself in the other:
    # the batch average puts half its mass at distance 1 for queries with a right neighbour
    grid, N = 3, 9
    right = torch.zeros(N, N)
    for i in range(N):
        j = i + 1 if i % grid < grid - 1 else i
        right[i, j] = 1
    attn = torch.stack([right, torch.eye(N)])[:, None]  # (2, 1, N, N)
    expected = 0.5 * 6 / N  # 6 queries have a right neighbour
    assert torch.allclose(nonlocality(attn), torch.tensor([expected]))


def test_patch_block_drops_prefix_and_renormalises():
    N = 4
    a = torch.rand(2, 3, N + 1, N + 1).softmax(-1)
    b = patch_block(a, N)
    assert b.shape == (2, 3, N, N)
    assert torch.allclose(b.sum(-1), torch.ones(2, 3, N))


def test_spectrum_of_known_covariance():
    torch.manual_seed(0)
    f = torch.randn(20000, 3) * torch.tensor([3.0, 2.0, 0.5])
    ev = covariance_spectrum(f)
    assert torch.allclose(ev, torch.tensor([9.0, 4.0, 0.25]), rtol=0.05)


def test_heldout_indices_balanced_and_fixed():
    labels = torch.arange(10).repeat_interleave(30)[torch.randperm(300)]
    a, b = heldout_indices(labels, 40), heldout_indices(labels, 40)
    assert torch.equal(a, b)
    assert torch.bincount(labels[a], minlength=10).tolist() == [4] * 10


class TinyViT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed(8, 2, 1, 16)
        self.blocks = torch.nn.Sequential(*[Block(16, Attention(16, 2)) for _ in range(2)])

    def forward(self, x):
        return self.blocks(self.patch_embed(x)).mean(1)


def test_collect_attention_from_hooks_matches_manual():
    torch.manual_seed(0)
    m = TinyViT()
    x = torch.randn(3, 1, 8, 8)
    maps = collect_attention(m, m, x)
    assert [la.name for la in maps] == ["blocks.0.attn", "blocks.1.attn"]
    tokens = m.patch_embed(x)
    expected = m.blocks[0].attn.attention_map(m.blocks[0].norm1(tokens))
    assert torch.allclose(maps[0].attn, expected)
    assert maps[1].attn.shape == (3, 2, 16, 16)


def test_run_hook_and_analyze_cli(tmp_path):
    from vitcl.cli import main

    common = [f"run.out_dir={tmp_path}", "run.name=r", "train.epochs=1", "train.max_batches=2",
              "data.train_per_class=20", "data.test_per_class=10", "memory.size=20", "data.increment=5"]
    assert main(["run", "replay/digits-b0inc2", *common, "eval.analyses=[nonlocality,spectrum,heatmaps]",
                 "eval.analysis_samples=40", "-q"]) == 0
    run = tmp_path / "r"
    recorded = json.loads((run / "analysis" / "locality.json").read_text())
    assert recorded["tasks"] == [0, 1] and len(recorded["layers"]) == 3
    assert len(recorded["eigenvalues"][0]) == 64
    assert (run / "plots" / "nonlocality.png").exists() and (run / "plots" / "attention_task_1.png").exists()
    assert main(["analyze", str(run), "--samples", "40"]) == 0
    again = json.loads((run / "analysis" / "locality.json").read_text())
    assert again["layers"] == recorded["layers"]
    for a, b in zip(again["nonlocality"], recorded["nonlocality"]):
        assert all(abs(x - y) < 1e-5 for x, y in zip(a, b))


def test_analyse_convit_with_lpsa_and_class_attention():
    from types import SimpleNamespace

    from vitcl.eval.locality import analyse_method
    from vitcl.models.convit import ConViT

    torch.manual_seed(0)
    m = ConViT(img_size=16, in_chans=1, patch_size=4, embed_dim=32, depth=3, local_up_to_layer=2, num_heads=4,
               sab_layers=["lpsa", "gpsa"])
    method = SimpleNamespace(model=m, logits=m, embed=m)
    res = analyse_method(method, torch.randn(10, 1, 16, 16), task=0, n_images=3, chunk=4)
    assert res.layers == ["encoder.blocks.0.attn", "encoder.blocks.1.attn"]
    assert len(res.nonlocality_heads[0]) == 4 and len(res.eigenvalues) == 32
    # at init LPSA is local: its 4 kernel heads look at the 2x2 neighbourhood, far below uniform attention
    assert res.nonlocality[0] < 0.5 * mean_patch_distance(4)
    hm = res.heatmaps
    assert hm["layers"] == ["encoder.blocks.0.attn", "encoder.blocks.1.attn", "decoder.blocks.0.attn"]
    assert hm["maps"].shape == (3, 3, 4, 4)
    assert torch.allclose(hm["maps"].sum((-1, -2)), torch.ones(3, 3))
