"""Rehearsal memory: a budget, a selection rule, and the stored indices (never image copies).

The budget says how many exemplars each seen class keeps; the selector orders a class's candidates. Old classes
shrink to their first m exemplars in selection order. Selection is deterministic and runs on the device, so
every DDP rank that sees the same features holds the same memory. `RankedMemory` holds one such memory per
emulated rank (DyTox's distributed memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import Registry
from .transfer import to_device


# --------------------------------------------------------------------------------------------- budgets
class FixedTotal:
    """A total of `size` exemplars split evenly over the seen classes (iCaRL, DyTox)."""

    def __init__(self, size: int):
        self.size = size

    def per_class(self, n_seen: int) -> int:
        return self.size // max(n_seen, 1)


class FixedPerClass:
    def __init__(self, m: int):
        self.m = m

    def per_class(self, n_seen: int) -> int:
        return self.m


def make_budget(size: int, per_class: int):
    if size and per_class:
        raise ConfigError("memory.per_class: give either memory.size or memory.per_class, not both")
    return FixedPerClass(per_class) if per_class else FixedTotal(size)


# --------------------------------------------------------------------------------------------- selectors
SELECTORS: Registry = Registry("memory selection")


class Selector:
    """Orders candidates of each class: `select(features, classes, k)` -> list of index tensors (best first).

    features: (n, d) float on any device, or None when the rule needs none; classes: (n,) labels of the rows.
    needs: what the memory must extract for it: 'embedding', 'scores' (per-sample confidence: one float per row,
    higher is better), or None.
    """

    needs: str | None = "embedding"

    def select(self, features: torch.Tensor | None, classes: torch.Tensor, k: int) -> list[torch.Tensor]:
        raise NotImplementedError


@SELECTORS.register("random")
class RandomSelector(Selector):
    """A seeded random subset per class; the seed mixes in the class so classes are independent."""

    needs = None

    def __init__(self, seed: int = 0):
        self.seed = seed

    def select(self, features, classes, k):
        out = []
        for c in classes.unique(sorted=True).tolist():
            rows = (classes == c).nonzero().flatten().cpu()
            g = torch.Generator().manual_seed(self.seed * 100_003 + c)
            out.append(rows[torch.randperm(len(rows), generator=g)[:k]])
        return out


@SELECTORS.register("herding")
class HerdingSelector(Selector):
    """iCaRL herding on L2-normalised features, all classes at once: (C, n_max, d) padded on the device."""

    def __init__(self, seed: int = 0):
        del seed  # herding is deterministic; selectors share one constructor

    def select(self, features, classes, k):
        labels = classes.unique(sorted=True)
        rows = [(classes == c).nonzero().flatten() for c in labels.tolist()]
        n_max, C = max(len(r) for r in rows), len(rows)
        feats = F.normalize(features.float(), dim=1)
        padded = feats.new_zeros(C, n_max, feats.shape[1])
        valid = torch.zeros(C, n_max, dtype=torch.bool, device=feats.device)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = feats[r.to(feats.device)]
            valid[i, : len(r)] = True
        return [rows[i].cpu()[sel] for i, sel in enumerate(herding(padded, valid, k))]


@SELECTORS.register("dytox-herding")
class DyToxHerdingSelector(HerdingSelector):
    """DyTox's `icarl_selection` (arthurdouillard/dytox, continual/rehearsal.py; docs/methods/dytox.md): herding
    with replacement. Each step takes the argmax over all of the class's samples, those already picked included,
    and the running sum moves by the pick even when it repeats; a repeat takes no slot. The memory holds the
    distinct picks in the order of their first pick, k of them (all samples if fewer), and if 1000 steps end
    before k distinct picks the slots left go to unpicked samples in candidate order."""

    max_steps = 1000

    def select(self, features, classes, k):
        labels = classes.unique(sorted=True)
        rows = [(classes == c).nonzero().flatten() for c in labels.tolist()]
        n_max, C = max(len(r) for r in rows), len(rows)
        feats = features.float()
        feats = feats / (feats.norm(dim=1, keepdim=True) + 1e-8)  # DyTox's normalisation, not F.normalize's
        padded = feats.new_zeros(C, n_max, feats.shape[1])
        valid = torch.zeros(C, n_max, dtype=torch.bool, device=feats.device)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = feats[r.to(feats.device)]
            valid[i, : len(r)] = True
        picks = herding_with_replacement(padded, valid, k, self.max_steps)
        return [rows[i].cpu()[sel] for i, sel in enumerate(picks)]


@SELECTORS.register("confidence")
class ConfidenceSelector(Selector):
    """Most confident first (LVT's confidence-aware memory): per class, the candidates in descending order of a
    per-sample score, here the model's softmax probability of the true class. Ties keep candidate order, so the
    choice is deterministic. Old classes shrink to their first m, i.e. their m most confident exemplars."""

    needs = "scores"

    def __init__(self, seed: int = 0):
        del seed  # herding is deterministic; selectors share one constructor

    def select(self, features, classes, k):
        if features is None:
            raise ValueError("confidence selection needs per-sample scores")
        scores = features.reshape(len(classes)).float().cpu()
        classes = classes.cpu()
        out = []
        for c in classes.unique(sorted=True).tolist():
            rows = (classes == c).nonzero().flatten()
            order = torch.sort(scores[rows], descending=True, stable=True).indices
            out.append(rows[order[:k]])
        return out


GRAM_BYTES = 256 * 1024**2  # classes are herded in groups whose Gram matrices fit in this many bytes


def class_groups(C: int, n: int, itemsize: int = 4) -> list[slice]:
    """Consecutive groups of classes whose (group, n, n) Gram matrices stay under GRAM_BYTES (one class at least)."""
    per = max(1, GRAM_BYTES // max(1, n * n * itemsize))
    return [slice(i, min(i + per, C)) for i in range(0, C, per)]


class GramRows:
    """Dot products among a group of classes' candidates, centred on their class mean mu_c, from one (C, n, n) Gram
    matrix (one matrix product): `row(best)` gives <x_best - mu, x_i - mu> (C, n) for one pick per class, `sq`
    ||x_i - mu||^2 and `mean_dot` <mu, x_i> (C, n); padded rows are zero. Centring keeps every running sum that
    herding builds from these rows small (herding holds the mean of its picks near mu), so float32 loses nothing
    to cancellation."""

    def __init__(self, feats: torch.Tensor, valid: torch.Tensor):
        mask = valid[..., None]
        mu = (feats * mask).sum(1) / valid.sum(1).clamp(min=1)[:, None]
        centred = (feats - mu[:, None, :]) * mask
        self.arange = torch.arange(feats.shape[0], device=feats.device)
        self.gram = torch.bmm(centred, centred.transpose(1, 2))
        self.sq = self.gram.diagonal(dim1=1, dim2=2)
        self.mean_dot = torch.bmm(feats * mask, mu[:, :, None]).squeeze(2)

    def row(self, best: torch.Tensor) -> torch.Tensor:
        return self.gram[self.arange, best]


def herding(feats: torch.Tensor, valid: torch.Tensor, k: int) -> list[torch.Tensor]:
    """feats (C, n, d), valid (C, n). Step j picks, per class, the unpicked sample whose addition brings the
    running mean of picks closest to the class mean. Returns per class the picked positions in order.

    With s' the sum of the j picks so far minus j mu, ||mu - (picks + x) / (j + 1)|| is ||s' + x - mu|| / (j + 1),
    whose square is, up to a term without x, ||x - mu||^2 + 2 <s', x - mu>: every step needs only <s', x - mu>,
    which grows by the centred Gram matrix's row of the pick (`GramRows`): O(n) per step after one (n, n) matrix
    product per class, instead of building (n, d) candidate means at every step."""
    C, n, _ = feats.shape
    out: list[torch.Tensor] = []
    for group in class_groups(C, n):
        out += _herding_group(feats[group], valid[group], k)
    return out


def _herding_group(feats: torch.Tensor, valid: torch.Tensor, k: int) -> list[torch.Tensor]:
    C, n, _ = feats.shape
    steps = min(k, n)
    dots = GramRows(feats, valid)
    sq = dots.sq
    sum_dot = torch.zeros_like(sq)  # <s', x_i - mu>
    available = valid.clone()
    arange = torch.arange(C, device=feats.device)
    picks = torch.full((C, steps), -1, dtype=torch.long, device=feats.device)
    for j in range(steps):
        score = (sq + 2 * sum_dot).masked_fill(~available, float("inf"))
        best = score.argmin(1)
        live = available.any(1)
        picks[:, j] = torch.where(live, best, torch.full_like(best, -1))
        sum_dot += dots.row(best) * live[:, None]
        available[arange[live], best[live]] = False
    return [p[p >= 0].cpu() for p in picks]


def herding_with_replacement(feats: torch.Tensor, valid: torch.Tensor, k: int,
                             max_steps: int = 1000) -> list[torch.Tensor]:
    """feats (C, n, d) unit rows, valid (C, n). iCaRL's original loop: w = mu, then per step pick
    argmax_i <w, x_i> over every valid sample and set w <- w + mu - x_pick, until min(k, n_c) distinct samples
    are picked or `max_steps` steps ran. Returns per class the distinct picks in first-pick order, completed
    with unpicked samples in candidate order up to min(k, n_c).

    After s steps w = mu - s', s' the sum of the picks minus s mu, so <w, x> is <mu, x> - <s', x - mu> up to a
    term without x: the same centred Gram matrix expansion as `herding`."""
    C, n, _ = feats.shape
    out: list[torch.Tensor] = []
    for group in class_groups(C, n):
        out += _herding_with_replacement_group(feats[group], valid[group], k, max_steps)
    return out


def _herding_with_replacement_group(feats: torch.Tensor, valid: torch.Tensor, k: int,
                                    max_steps: int) -> list[torch.Tensor]:
    C, n, _ = feats.shape
    dots = GramRows(feats, valid)
    mean_dot = dots.mean_dot
    counts = valid.sum(1)
    target = counts.clamp(max=k)
    picked_dot = torch.zeros_like(mean_dot)  # <s', x_i - mu>
    never = n + 1  # first-pick step of a sample never picked
    first = torch.full((C, n), never, dtype=torch.long, device=feats.device)
    n_picked = torch.zeros(C, dtype=torch.long, device=feats.device)
    arange = torch.arange(C, device=feats.device)
    for _ in range(max_steps):
        active = n_picked < target
        if not bool(active.any()):
            break
        score = (mean_dot - picked_dot).masked_fill(~valid, float("-inf"))
        best = score.argmax(1)
        new = active & (first[arange, best] == never)
        first[arange[new], best[new]] = n_picked[new]
        n_picked = n_picked + new.long()
        picked_dot += dots.row(best) * active[:, None]
    key = first.masked_fill(~valid, never + 1)
    order = torch.sort(key, dim=1, stable=True).indices
    return [order[c, : int(target[c])].cpu() for c in range(C)]


def make_selector(name: str, seed: int = 0) -> Selector:
    return SELECTORS.get(name, "memory.selection")(seed=seed)


# --------------------------------------------------------------------------------------------- memory
class Memory:
    """Exemplar indices per class (ordered best first) plus optional per-exemplar tensors (`extras`: a method's
    stored logits and the like), which `lookup` finds again by train-set row."""

    per_batch = False  # filled at task ends (a StreamMemory is filled while a task trains)

    def __init__(self, budget, selector: Selector):
        self.budget = budget
        self.selector = selector
        self.exemplars: dict[int, torch.Tensor] = {}
        self.extras: dict[str, dict[int, torch.Tensor]] = {}
        self._positions: torch.Tensor | None = None  # train-set row -> position in indices(), -1 if not stored
        self._on_device: dict[tuple[str, str], torch.Tensor] = {}  # extra(name) moved to a device

    def __len__(self) -> int:
        return sum(len(v) for v in self.exemplars.values())

    @property
    def enabled(self) -> bool:
        return self.budget.per_class(1) > 0

    def indices(self) -> torch.Tensor:
        if not self.exemplars:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([self.exemplars[c] for c in sorted(self.exemplars)])

    def extra(self, name: str) -> torch.Tensor:
        """The stored tensors `name`, row-aligned with indices()."""
        return torch.cat([self.extras[name][c] for c in sorted(self.exemplars)])

    def lookup(self, name: str, rows: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """The extras `name` of the train-set rows `rows` (all stored in the memory), in their order, on `device`
        (default: the CPU). The row map and the device copy are built once per memory content, since a memory
        batch looks them up every step."""
        if self._positions is None:
            idx = self.indices()
            pos = torch.full((int(idx.max()) + 1 if len(idx) else 0,), -1, dtype=torch.long)
            pos[idx] = torch.arange(len(idx))
            self._positions = pos
        pos, rows = self._positions, rows.cpu()
        if bool((rows >= len(pos)).any()) or bool((pos[rows] < 0).any()):
            raise KeyError(f"memory extras '{name}': asked for rows that the memory does not store")
        key = (name, str(torch.device(device or "cpu")))
        if key not in self._on_device:
            self._on_device[key] = to_device(self.extra(name), key[1])
        values = self._on_device[key]
        return values[to_device(pos[rows], values.device)]

    def stores(self, rows: torch.Tensor) -> torch.Tensor:
        """Bool mask: which of the train-set `rows` the memory holds."""
        return torch.isin(rows.cpu(), self.indices())

    def _changed(self) -> None:
        self._positions, self._on_device = None, {}

    def shrink(self, m: int) -> None:
        self._changed()
        for c in self.exemplars:
            self.exemplars[c] = self.exemplars[c][:m]
            for store in self.extras.values():
                store[c] = store[c][:m]

    def add(self, candidates: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None, n_seen: int,
            extras: dict[str, torch.Tensor] | None = None) -> None:
        """Shrink old classes to the new per-class budget, then select new classes among `candidates`."""
        m = self.budget.per_class(n_seen)
        self.shrink(m)
        if m == 0 or len(candidates) == 0:
            return
        chosen = self.selector.select(features, labels, m)
        for c, rows in zip(labels.unique(sorted=True).tolist(), chosen):
            self.exemplars[c] = candidates[rows].clone()
            for name, values in (extras or {}).items():
                self.extras.setdefault(name, {})[c] = values[rows.to(values.device)].detach().cpu().clone()
        self._changed()

    def state_dict(self) -> dict:
        return {"exemplars": dict(self.exemplars), "extras": {k: dict(v) for k, v in self.extras.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._changed()
        self.exemplars = dict(state["exemplars"])
        self.extras = {k: dict(v) for k, v in state["extras"].items()}


# --------------------------------------------------------------------------------------------- per-rank memory
class RankedMemory:
    """DyTox's distributed memory (docs/methods/dytox.md#memory-modes): `ranks` banks, one per emulated rank, each a
    `Memory` of the full budget (the budget is per rank, as the published --memory-size is per process), each
    filled by its own selection on its own feature draws. This process trains on the banks of `local`, the
    emulated ranks it holds (ranks / world of them); after every update `synchronise` gives every process every
    bank, so checkpoints hold them all and every process holds the same state.

    Methods see the Memory interface: `indices()`, `extra()` and `lookup()` cover the local banks (the rows this
    process rehearses); the engine fills each bank through `TaskContext.memory_banks`."""

    per_batch = False

    def __init__(self, budget, selectors: list[Selector], local: list[int]):
        self.banks = [Memory(budget, s) for s in selectors]
        self.local = local

    @property
    def ranks(self) -> int:
        return len(self.banks)

    @property
    def budget(self):
        return self.banks[0].budget

    @property
    def selector(self) -> Selector:
        return self.banks[0].selector

    @property
    def enabled(self) -> bool:
        return self.banks[0].enabled

    def __len__(self) -> int:
        return sum(len(b) for b in self.banks)

    def indices(self) -> torch.Tensor:
        """The local banks' rows, bank after bank (a row two banks hold appears twice)."""
        return torch.cat([self.banks[r].indices() for r in self.local])

    def extra(self, name: str) -> torch.Tensor:
        return torch.cat([self.banks[r].extra(name) for r in self.local])

    def lookup(self, name: str, rows: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """The extras `name` of `rows`, each from the first local bank that stores it."""
        rows = rows.cpu()
        out: torch.Tensor | None = None
        found = torch.zeros(len(rows), dtype=torch.bool)
        for r in self.local:
            here = self.banks[r].stores(rows) & ~found
            if not bool(here.any()):
                continue
            values = self.banks[r].lookup(name, rows[here], device)
            if out is None:
                out = values.new_zeros((len(rows),) + tuple(values.shape[1:]))
            out[here.to(out.device)] = values
            found |= here
        if out is None or not bool(found.all()):
            raise KeyError(f"memory extras '{name}': asked for rows that no local bank stores")
        return out

    def add(self, *args, **kwargs) -> None:
        raise TypeError("a RankedMemory is filled bank by bank (TaskContext.memory_banks), not through add()")

    def synchronise(self) -> None:
        """Every process gets every bank from the process that holds its emulated rank (a no-op on one process)."""
        from . import distributed

        if distributed.world_size() == 1:
            return
        mine = {r: self.banks[r].state_dict() for r in self.local}
        for part in distributed.all_gather_objects(mine):
            for r, state in part.items():
                if r not in self.local:
                    self.banks[r].load_state_dict(state)

    def state_dict(self) -> dict:
        return {"ranks": self.ranks, "banks": [b.state_dict() for b in self.banks]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("ranks") != self.ranks:
            raise ValueError(f"the checkpoint's memory has {state.get('ranks', 1)} rank bank(s), "
                             f"memory.ranks is {self.ranks}")
        for bank, s in zip(self.banks, state["banks"]):
            bank.load_state_dict(s)


def local_ranks(ranks: int, rank: int, world: int) -> list[int]:
    """The emulated ranks process `rank` of `world` holds: a contiguous block of ranks / world of them."""
    if ranks % world:
        raise ConfigError(f"memory.ranks: {ranks} emulated ranks do not split over {world} processes "
                          f"(expected a multiple of the world size)")
    per = ranks // world
    return list(range(rank * per, (rank + 1) * per))


def make_memory(budget, selection: str, seed: int, ranks: int = 1, rank: int = 0, world: int = 1):
    """One global Memory (ranks = 1), or a RankedMemory of `ranks` banks; bank r's selector is seeded with
    seed + 7919 r, so seeded random selections differ between banks (bank 0 is the global memory's)."""
    if ranks == 1:
        return Memory(budget, make_selector(selection, seed))
    return RankedMemory(budget, [make_selector(selection, seed + 7919 * r) for r in range(ranks)],
                        local_ranks(ranks, rank, world))
