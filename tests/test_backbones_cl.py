import torch

from vitcl.models import create_backbone
from vitcl.models.cct import CCT, sequence_pool


def test_cct_7_3x1_matches_the_papers_count_with_a_10_class_head():
    model = CCT(32, 3)
    count = sum(p.numel() for p in model.parameters()) + model.num_features * 10 + 10
    assert abs(count - 3.76e6) / 3.76e6 < 0.01, count
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 256)


def test_sequence_pool_matches_a_transcription():
    torch.manual_seed(0)
    tokens, score = torch.randn(2, 5, 4), torch.nn.Linear(4, 1)
    expected = torch.stack([sum(w * t for w, t in zip(torch.softmax(score(x)[:, 0], 0), x)) for x in tokens])
    torch.testing.assert_close(sequence_pool(tokens, score), expected)


def test_cct_builds_by_name_and_gradients_flow():
    model = create_backbone(CCT.Options(embed_dim=32, depth=2, num_heads=2), 28, 1)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
