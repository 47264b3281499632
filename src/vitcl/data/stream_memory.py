"""A rehearsal memory updated while a task trains (the protocol of ER, DER and DER++; Buzzega et al. 2020).

`StreamMemory` holds a fixed number of slots; each slot keeps a train-set row, its label and task, and the tensors
a method stores with it (DER's logits). The same row can sit in two slots with different extras, since every epoch
streams the task's samples again, so extras belong to slots, never to rows. A `StreamPolicy` decides where each
streamed sample goes. Every decision depends only on (seed, the sample's index in the run's whole stream), and the
stream index is the count of samples streamed before this epoch plus the sample's position in the epoch's global
batches: 1 or N processes, any split of a batch into micro-batches and a resume give the same memory. The
decisions read nothing from the device (positions and labels are on the host), so an update costs no host sync;
the extras are written into device tensors.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import Registry
from .transfer import to_device

STREAM_POLICIES: Registry = Registry("memory selection (per batch)")
_MASK64 = (1 << 64) - 1


def stream_uniform(seed: int, n: int, bound: int) -> int:
    """A uniform integer in [0, bound) for stream index n: splitmix64 of (seed, n), reduced by rejection so that
    it is exactly uniform (Vitter's algorithm R needs exact 1/(n+1) odds)."""
    limit = (1 << 64) - ((1 << 64) % bound)
    k = 0
    while True:
        z = (seed * 0x9E3779B97F4A7C15 + (n << 8) + k) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        if z < limit:
            return z % bound
        k += 1


def stream_fraction(seed: int, n: int) -> float:
    """A uniform float in [0, 1) for stream index n."""
    return stream_uniform(seed, n, 1 << 53) / float(1 << 53)


class StreamPolicy:
    """Where streamed samples go: `place(memory, n, label, sample)` -> the slot to overwrite, or -1 to skip; n is the
    sample's stream index, `sample` its row in the step's tensors given to `observe`. `score` is what the memory
    keeps in the slot's `scores` entry (GSS)."""

    score = 0.0

    def __init__(self, seed: int = 0):
        self.seed = seed

    def place(self, memory: StreamMemory, n: int, label: int, sample: int) -> int:
        raise NotImplementedError


@STREAM_POLICIES.register("reservoir")
class Reservoir(StreamPolicy):
    """Vitter's algorithm R (Mammoth's `reservoir`): the n-th sample (0-based) fills slot n while the memory has room,
    then replaces slot j, j uniform in [0, n], when j < M; every sample of the stream so far is in the memory with
    probability M / (n + 1)."""

    def place(self, memory, n, label, sample):
        if n < memory.capacity:
            return n
        j = stream_uniform(self.seed, n, n + 1)
        return j if j < memory.capacity else -1


@STREAM_POLICIES.register("class-balanced-reservoir")
class ClassBalancedReservoir(StreamPolicy):
    """Class-balancing reservoir sampling (CBRS; Chrysakis & Moens, ICML 2020, Algorithm 1). While there is room, store.
    Once full: a sample of a class that is not among the largest stored classes replaces a random stored sample of
    a largest class (ties: the lowest label; the class of the sample then counts as 'full'); a sample of a full
    class c replaces a random stored sample of c with probability m_c / n_c (m_c stored, n_c streamed so far)."""

    def place(self, memory, n, label, sample):
        memory.class_seen[label] = memory.class_seen.get(label, 0) + 1
        if memory.filled < memory.capacity:
            return memory.filled
        counts = memory.class_counts()
        largest = max(counts.values())
        if label not in memory.full_classes and counts.get(label, 0) < largest:
            victim = min(c for c, k in counts.items() if k == largest)
            memory.full_classes.add(victim)
            return self._random_slot_of(memory, victim, n)
        memory.full_classes.add(label)
        m_c, n_c = counts.get(label, 0), memory.class_seen[label]
        if stream_uniform(self.seed, n, n_c) < m_c:
            return self._random_slot_of(memory, label, n)
        return -1

    def _random_slot_of(self, memory, label, n):
        slots = (memory.labels[: memory.filled] == label).nonzero().flatten()
        return int(slots[stream_uniform(self.seed + 1, n, len(slots))])


@STREAM_POLICIES.register("gss")
class GradientSampleSelection(StreamPolicy):
    """GSS-Greedy (Aljundi et al., NeurIPS 2019, Algorithm 2, as Mammoth's utils/gss_buffer.py): a slot's score is the
    largest cosine similarity + 1 between its sample's loss gradient and those of a random subset of the memory
    when it was stored. The method sets, before each step's `observe`, `batch_score` (the score of the step's mean
    gradient against the subset) and `sample_score(sample)` (one streamed sample's score, computed on demand).
    While the stream has fewer than M samples, sample n fills slot n with the batch score. Then, if the batch
    score is below 1, each sample draws a slot with probability proportional to the scores and replaces it with
    probability s_slot / (s_slot + its own score); a batch whose score is 1 or more is not stored."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.batch_score = 0.1  # Mammoth's score of the first batch, when the memory is empty
        self.sample_score = lambda sample: 0.0

    def place(self, memory, n, label, sample):
        if n < memory.capacity:
            self.score = self.batch_score
            return n
        if self.batch_score >= 1:
            return -1
        single = float(self.sample_score(sample))
        scores = memory.scores[: memory.filled].double()
        cumulative = (scores / scores.sum()).cumsum(0)
        slot = min(int(torch.searchsorted(cumulative, torch.tensor(stream_fraction(self.seed, n),
                                                                   dtype=torch.float64))), memory.filled - 1)
        s = float(scores[slot])
        if stream_fraction(self.seed + 1, n) < s / (s + single):
            self.score = single
            return slot
        return -1


class StreamMemory:
    """`capacity` slots of (train-set row, label, task id, extras), filled by a StreamPolicy as batches stream.

    The engine's memory batch draws among the filled slots (`indices()` gives their rows, slot order) and hands the
    drawn slot ids to the method in `batch.memory.slot`, whose extras `extra_at(name, slots)` returns."""

    per_batch = True

    def __init__(self, capacity: int, policy: StreamPolicy):
        self.capacity = capacity
        self.policy = policy
        self.rows = torch.full((capacity,), -1, dtype=torch.long)
        self.labels = torch.full((capacity,), -1, dtype=torch.long)
        self.tasks = torch.full((capacity,), -1, dtype=torch.long)
        self.extras: dict[str, torch.Tensor] = {}
        self.scores = torch.zeros(capacity, dtype=torch.float64)  # the policy's score of each slot (GSS)
        self.filled = 0
        self.streamed = 0  # samples streamed before the current epoch plus those of this epoch so far
        self.epoch_base = 0  # samples streamed before the current epoch
        self.class_seen: dict[int, int] = {}
        self.full_classes: set[int] = set()

    # ------------------------------------------------------------------ what the engine reads
    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return self.filled

    def indices(self) -> torch.Tensor:
        return self.rows[: self.filled].clone()

    def class_counts(self) -> dict[int, int]:
        labels, counts = self.labels[: self.filled].unique(return_counts=True)
        return dict(zip(labels.tolist(), counts.tolist()))

    def extra_at(self, name: str, slots: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """The extras `name` of the memory's `slots`, on `device` (default: where they are stored)."""
        values = self.extras[name]
        if device is not None and values.device != torch.device(device):
            values = self.extras[name] = to_device(values, device)
        return values[to_device(slots, values.device)]

    # ------------------------------------------------------------------ streaming
    def begin_epoch(self) -> None:
        self.epoch_base = self.streamed

    def observe(self, rows: torch.Tensor, labels: torch.Tensor, tasks: torch.Tensor, positions: torch.Tensor,
                extras: dict[str, torch.Tensor] | None = None) -> None:
        """Stream one step's samples: rows, labels, tasks and positions (each row's place in the epoch's global
        batches) on the host, extras row-aligned on any device. Samples are taken in position order, so giving
        the step in one call or in several (micro-batches, ranks) in any order of rows gives the same memory as
        long as each call holds later positions than the previous (the ranks' shares are gathered first)."""
        order = torch.argsort(positions.cpu(), stable=True)
        rows, labels, tasks = rows.cpu()[order], labels.cpu()[order], tasks.cpu()[order]
        positions = positions.cpu()[order]
        chosen_slots, chosen_samples = [], []
        for i, (pos, label) in enumerate(zip(positions.tolist(), labels.tolist())):
            n = self.epoch_base + pos
            slot = self.policy.place(self, n, label, int(order[i]))
            if slot >= 0:
                self.rows[slot], self.labels[slot], self.tasks[slot] = rows[i], label, tasks[i]
                self.scores[slot] = self.policy.score
                self.filled = max(self.filled, slot + 1)
                chosen_slots.append(slot)
                chosen_samples.append(i)
            self.streamed = max(self.streamed, n + 1)
        if not chosen_slots or not extras:
            return
        # a slot written twice in one step keeps the later sample, as a sequential stream would
        last: dict[int, int] = {}
        for slot, i in zip(chosen_slots, chosen_samples):
            last[slot] = i
        slots = torch.tensor(list(last.keys()))
        samples = order[torch.tensor(list(last.values()))]
        for name, values in extras.items():
            store = self._store(name, values)
            store[to_device(slots, store.device)] = values.detach()[to_device(samples, values.device)].to(store.dtype)

    def _store(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """The slot tensor of extras `name`, allocated on the first write (zeros), widened when a later write
        has more columns (a growing head's logits: the new columns of older slots stay zero)."""
        shape = tuple(values.shape[1:])
        store = self.extras.get(name)
        if store is None:
            store = values.new_zeros((self.capacity,) + shape)
        elif store.shape[1:] != shape:
            if len(shape) != 1 or store.dim() != 2 or shape[0] < store.shape[1]:
                raise ValueError(f"memory extras '{name}': rows of shape {shape} after {tuple(store.shape[1:])}")
            wider = store.new_zeros((self.capacity, shape[0]))
            wider[:, : store.shape[1]] = store
            store = wider
        if store.device != values.device:  # restored from a checkpoint on the host
            store = store.to(values.device)
        self.extras[name] = store
        return store

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "rows": self.rows.clone(), "labels": self.labels.clone(),
                "tasks": self.tasks.clone(), "scores": self.scores.clone(),
                "extras": {k: v.detach().cpu().clone() for k, v in self.extras.items()},
                "filled": self.filled, "streamed": self.streamed, "epoch_base": self.epoch_base,
                "class_seen": dict(self.class_seen), "full_classes": sorted(self.full_classes)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("capacity") != self.capacity:
            raise ValueError(f"the checkpoint's memory has {state.get('capacity')} slots, memory.size is "
                             f"{self.capacity}")
        device = next(iter(self.extras.values())).device if self.extras else None
        self.rows, self.labels, self.tasks = state["rows"].clone(), state["labels"].clone(), state["tasks"].clone()
        self.scores = state["scores"].clone()
        self.extras = {k: v.clone() if device is None else v.to(device) for k, v in state["extras"].items()}
        self.filled, self.streamed, self.epoch_base = state["filled"], state["streamed"], state["epoch_base"]
        self.class_seen = dict(state["class_seen"])
        self.full_classes = set(state["full_classes"])

    def to(self, device: torch.device | str) -> StreamMemory:
        self.extras = {k: v.to(device) for k, v in self.extras.items()}
        return self


def make_stream_memory(size: int, selection: str, seed: int) -> StreamMemory:
    if size <= 0:
        raise ConfigError(f"memory.size: memory.selection '{selection}' fills a fixed number of slots; give "
                          f"memory.size > 0")
    return StreamMemory(size, STREAM_POLICIES.get(selection, "memory.selection")(seed=seed))
