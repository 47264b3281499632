import numpy as np
import pytest
import torch

from vitcl.data.memory import DyToxHerdingSelector, HerdingSelector, make_selector


def icarl_selection_reference(features: np.ndarray, k: int, max_steps: int = 1000) -> list[int]:
    """DyTox's icarl_selection (arthurdouillard/dytox, continual/rehearsal.py), one class, transcribed loop by
    loop: the pick may repeat, w moves by every pick, a sample's rank is its first pick. Ties of the never-picked
    samples are taken in index order (numpy's default sort leaves their order unspecified)."""
    D = features.T / (np.linalg.norm(features.T, axis=0) + 1e-8)
    mu = D.mean(axis=1)
    rank = np.zeros(features.shape[0])
    w, picked, steps = mu, 0, 0
    while not (np.sum(rank != 0) == min(k, features.shape[0])) and steps < max_steps:
        i = int(np.argmax(w @ D))
        steps += 1
        if rank[i] == 0:
            rank[i] = 1 + picked
            picked += 1
        w = w + mu - D[:, i]
    rank[rank == 0] = 10000
    return np.argsort(rank, kind="stable")[:k].tolist()


def _features(n_per_class, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(sum(n_per_class), d, generator=g, dtype=torch.float64)
    classes = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    return feats, classes


@pytest.mark.parametrize("k", [5, 18, 40])
def test_dytox_herding_matches_the_transcribed_loop(k):
    feats, classes = _features([30, 22, 12])
    chosen = make_selector("dytox-herding").select(feats, classes, k)
    for c, rows in enumerate(chosen):
        idx = (classes == c).nonzero().flatten()
        expected = idx[icarl_selection_reference(feats[idx].numpy(), k)]
        assert rows.tolist() == expected.tolist()
        assert len(set(rows.tolist())) == len(rows) == min(k, len(idx))  # distinct: a repeat takes no slot


def test_dytox_herding_step_cap_fills_with_unpicked_samples_in_order():
    feats, classes = _features([30, 25], seed=3)
    sel = DyToxHerdingSelector()
    sel.max_steps = 8
    chosen = sel.select(feats, classes, 20)
    for c, rows in enumerate(chosen):
        idx = (classes == c).nonzero().flatten()
        assert rows.tolist() == idx[icarl_selection_reference(feats[idx].numpy(), 20, max_steps=8)].tolist()
        assert len(rows) == 20


def test_dytox_herding_repeats_and_departs_from_without_replacement_at_large_budgets():
    feats, classes = _features([60], d=4, seed=1)
    ours = HerdingSelector().select(feats, classes, 40)[0]
    theirs = DyToxHerdingSelector().select(feats, classes, 40)[0]
    assert ours[:2].tolist() == theirs[:2].tolist()  # here the first repeat comes at the third step
    assert set(ours.tolist()) != set(theirs.tolist())
