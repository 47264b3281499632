import pytest
import torch
import torch.nn.functional as F

from vitcl.data.memory import FixedPerClass, FixedTotal, HerdingSelector, Memory, RandomSelector, herding


def herding_reference(feats: torch.Tensor, k: int) -> list[int]:
    """iCaRL herding, one class, transcribed directly: pick the sample that brings the mean of picks closest to mu."""
    feats = F.normalize(feats, dim=1)
    mu = feats.mean(0)
    picked, total = [], torch.zeros_like(mu)
    for j in range(1, min(k, len(feats)) + 1):
        best, best_d = None, float("inf")
        for i in range(len(feats)):
            if i in picked:
                continue
            d = torch.norm(mu - (total + feats[i]) / j).item()
            if d < best_d:
                best, best_d = i, d
        picked.append(best)
        total = total + feats[best]
    return picked


def test_herding_matches_slow_reference_for_every_class():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 8, generator=g, dtype=torch.float64)
    classes = torch.tensor([0] * 25 + [1] * 20 + [2] * 15)
    chosen = HerdingSelector().select(feats, classes, k=10)
    for c, rows in zip(range(3), chosen):
        idx = (classes == c).nonzero().flatten()
        expected = idx[herding_reference(feats[idx], 10)]
        assert rows.tolist() == expected.tolist()


def test_herding_with_budget_larger_than_class_takes_all_once():
    feats = torch.randn(2, 5, 4)
    valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
    picks = herding(feats, valid, k=4)
    assert sorted(picks[0].tolist()) == sorted(set(picks[0].tolist())) and len(picks[0]) == 4
    assert sorted(picks[1].tolist()) == [0, 1]


def test_fixed_total_budget_shrinks_old_classes_to_their_first_exemplars():
    mem = Memory(FixedTotal(12), RandomSelector(seed=1))
    cand = torch.arange(100, 140)
    labels = torch.tensor([0] * 20 + [1] * 20)
    mem.add(cand, labels, None, n_seen=2)
    first = {c: v.clone() for c, v in mem.exemplars.items()}
    assert all(len(v) == 6 for v in mem.exemplars.values())
    mem.add(torch.arange(200, 220), torch.tensor([2] * 10 + [3] * 10), None, n_seen=4)
    assert len(mem) == 12 and all(len(v) == 3 for v in mem.exemplars.values())
    for c in (0, 1):
        assert mem.exemplars[c].tolist() == first[c][:3].tolist()


def test_fixed_per_class_and_extras_stay_aligned():
    mem = Memory(FixedPerClass(2), RandomSelector(seed=0))
    cand = torch.arange(10)
    labels = torch.tensor([0] * 5 + [1] * 5)
    logits = torch.arange(10).float()[:, None].repeat(1, 3)
    mem.add(cand, labels, None, n_seen=2, extras={"logits": logits})
    assert torch.equal(mem.extra("logits")[:, 0].long(), mem.indices())


def test_random_selection_is_deterministic():
    labels = torch.tensor([0] * 30)
    a = RandomSelector(seed=3).select(None, labels, 5)[0]
    b = RandomSelector(seed=3).select(None, labels, 5)[0]
    assert torch.equal(a, b)


def test_memory_state_round_trip():
    mem = Memory(FixedTotal(4), RandomSelector(0))
    mem.add(torch.arange(8), torch.tensor([0] * 4 + [1] * 4), None, 2)
    other = Memory(FixedTotal(4), RandomSelector(0))
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.indices(), mem.indices())


def test_lookup_finds_extras_by_row_and_follows_changes():
    mem = Memory(FixedTotal(6), RandomSelector(seed=0))
    cand = torch.arange(100, 112)
    labels = torch.tensor([0] * 6 + [1] * 6)
    logits = cand.float()[:, None].repeat(1, 2)  # each row's extra is its own row number
    mem.add(cand, labels, None, n_seen=2, extras={"logits": logits})
    rows = mem.indices().flip(0)
    assert torch.equal(mem.lookup("logits", rows)[:, 0].long(), rows)
    mem.add(torch.arange(200, 206), torch.tensor([2] * 6), None, n_seen=3,
            extras={"logits": torch.arange(200, 206).float()[:, None].repeat(1, 2)})  # 2 per class now
    rows = mem.indices()
    assert len(rows) == 6 and torch.equal(mem.lookup("logits", rows)[:, 0].long(), rows)
    dropped = next(r for r in cand.tolist() if r not in rows.tolist())
    for missing in (dropped, 999):
        with pytest.raises(KeyError):
            mem.lookup("logits", torch.tensor([missing]))


def test_herding_in_class_groups_picks_as_one_group(monkeypatch):
    """The Gram matrices are built for groups of classes that fit a byte budget; the grouping changes nothing."""
    from vitcl.data import memory

    g = torch.Generator().manual_seed(3)
    feats = F.normalize(torch.randn(4, 30, 16, generator=g), dim=2)
    valid = torch.ones(4, 30, dtype=torch.bool)
    valid[1, 20:] = False
    valid[3, 7:] = False
    together = memory.herding(feats, valid, 12)
    again = memory.herding_with_replacement(feats, valid, 12)
    monkeypatch.setattr(memory, "GRAM_BYTES", 1)  # one class per group
    assert len(memory.class_groups(4, 30)) == 4
    assert [p.tolist() for p in memory.herding(feats, valid, 12)] == [p.tolist() for p in together]
    assert [p.tolist() for p in memory.herding_with_replacement(feats, valid, 12)] == [p.tolist() for p in again]


def test_herding_matches_the_reference_with_many_picks_in_float32():
    """A larger class in the selector's float32: the Gram-matrix expansion picks what the direct distance does."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(120, 48, generator=g)
    classes = torch.zeros(120, dtype=torch.long)
    (rows,) = HerdingSelector().select(feats, classes, k=70)
    assert rows.tolist() == herding_reference(feats.double(), 70)


def test_herding_of_features_far_from_the_origin_keeps_float32_exact():
    """Features that share a large common part (as trained embeddings do): the running sums of the expansion
    would cancel in float32 unless centred on the class mean; the picks are those of the float64 reference."""
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(300, 32, generator=g) * 0.02 + 1.0  # the uncentred expansion departs at this spread
    classes = torch.zeros(300, dtype=torch.long)
    (rows,) = HerdingSelector().select(feats, classes, k=200)
    assert rows.tolist() == herding_reference(feats.double(), 200)
