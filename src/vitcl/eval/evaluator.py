"""The evaluation pass. Methods give logits; accuracy is computed here only.

One forward pass per test batch yields class-IL top-1/top-k (argmax over all seen classes) and task-IL top-1
(argmax within the sample's own task's classes) for every seen task. Task-conditioned methods (one set of
parameters per task) are run once per task with its id and are scored task-IL only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..data.augment import BatchAugment
from ..data.distributed import all_reduce_sum, rank, world_size
from ..data.stream import BatchStream, rank_share
from ..data.transfer import to_device


@dataclass
class EvalResult:
    task: int  # the last task trained
    class_il: list[float] = field(default_factory=list)  # per seen task
    class_il_topk: list[float] = field(default_factory=list)
    task_il: list[float] = field(default_factory=list)
    seen_class_il: float = math.nan  # over all seen test samples
    seen_class_il_topk: float = math.nan
    seen_task_il: float = math.nan
    n_test: list[int] = field(default_factory=list)
    # per extra scorer: the accuracy fields above (class_il, class_il_topk, task_il, seen_*), same meaning
    extra: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The fields as a dict; `extra` only when a method has extra scorers (other runs' records keep their keys)."""
        out = dict(vars(self))
        if not out["extra"]:
            del out["extra"]
        return out


SCORE_FIELDS = ("class_il", "class_il_topk", "task_il", "seen_class_il", "seen_class_il_topk", "seen_task_il")


def _hits(logits: torch.Tensor, y: torch.Tensor, in_task: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 3) per sample: class-IL top-1 hit, class-IL top-k hit, task-IL top-1 hit."""
    top = logits.topk(k, dim=1).indices
    hit1 = top[:, 0] == y
    hitk = (top == y[:, None]).any(1)
    til = logits.masked_fill(~in_task, float("-inf")).argmax(1) == y
    return torch.stack([hit1, hitk, til], 1)


def _accuracies(n: torch.Tensor, hits: torch.Tensor) -> dict:
    """Per-task and over-all-seen accuracies (percent) from counts n (T,) and hits (T, 3)."""
    safe = n.clamp(min=1)
    return {"class_il": (100 * hits[:, 0] / safe).tolist(), "class_il_topk": (100 * hits[:, 1] / safe).tolist(),
            "task_il": (100 * hits[:, 2] / safe).tolist(),
            "seen_class_il": float(100 * hits[:, 0].sum() / safe.sum()),
            "seen_class_il_topk": float(100 * hits[:, 1].sum() / safe.sum()),
            "seen_task_il": float(100 * hits[:, 2].sum() / safe.sum())}


@torch.inference_mode()  # no autograd bookkeeping at all (constants cached by the models are built outside it)
def evaluate(method, scenario, upto: int, augment: BatchAugment, stream: BatchStream, batch_size: int,
             top_k: int = 5, autocast=None) -> EvalResult:
    was_training = method.model.training
    try:
        return _evaluate(method, scenario, upto, augment, stream, batch_size, top_k, autocast)
    finally:  # also when a batch runs out of memory and the caller tries again with smaller ones
        method.model.train(was_training)


def _evaluate(method, scenario, upto: int, augment: BatchAugment, stream: BatchStream, batch_size: int,
              top_k: int, autocast) -> EvalResult:
    model = method.model
    model.eval()
    T = upto + 1
    names = sorted(method.extra_scorers()) if not method.task_conditioned else []
    # counts[j] = (n, class-IL top-1, class-IL top-k, task-IL top-1), then the same three per extra scorer; summed
    # where the scores are and read once at the end: labels and task ids come from the host, so no batch waits
    counts = torch.zeros(T, 4 + 3 * len(names), dtype=torch.float64, device=stream.device)
    seen = scenario.seen_classes(upto)
    k = min(top_k, seen)
    tasks_of = scenario.task_of_label
    test_labels = scenario.test_labels
    offsets = torch.tensor([scenario[i].offset for i in range(T)])
    ends = torch.tensor([scenario[i].end for i in range(T)])
    idx_all = torch.cat([scenario[t].test_idx for t in range(T)])
    batches = [rank_share(b, rank(), world_size()) for b in idx_all.split(batch_size)]
    conditioned = method.task_conditioned
    for x_u8, idx in stream([b for b in batches if len(b)]):
        x = augment.test(x_u8)
        y_host = test_labels[idx]
        t_host = tasks_of[y_host]
        y, t = to_device(y_host, x.device), to_device(t_host, x.device)
        if conditioned:
            for tt in range(T):
                at = (t_host == tt).nonzero().flatten()
                if not len(at):
                    continue
                at = to_device(at, x.device)
                with autocast():
                    logits = method.logits(x.index_select(0, at), task=tt).float()
                pred = logits.argmax(1) + scenario[tt].offset
                counts[tt, 0] += len(at)
                counts[tt, 3] += (pred == y.index_select(0, at)).sum()
            continue
        with autocast():
            main, extra = method.scores(x)
        cols = torch.arange(seen, device=x.device)[None]
        lo, hi = to_device(offsets[t_host], x.device)[:, None], to_device(ends[t_host], x.device)[:, None]
        in_task = (cols >= lo) & (cols < hi)
        rows = [torch.ones_like(y, dtype=torch.bool)[:, None]]
        for name, logits in [("", main), *sorted(extra.items())]:
            if logits.shape[1] != seen:  # a method's bug, checked also under python -O
                what = f"scores '{name}'" if name else "logits"
                raise RuntimeError(f"{method.name}: {what} cover {logits.shape[1]} classes, {seen} are seen")
            rows.append(_hits(logits.float(), y, in_task, k))
        if sorted(extra) != names:  # a method's bug
            raise RuntimeError(f"{method.name}: scores gave extra scorers {sorted(extra)}, it declares {names}")
        counts.index_add_(0, t, torch.cat(rows, 1).double())
    counts = counts.cpu()
    all_reduce_sum(counts)
    n = counts[:, 0].clamp(min=1)
    res = EvalResult(task=upto, n_test=counts[:, 0].long().tolist())
    res.task_il = (100 * counts[:, 3] / n).tolist()
    res.seen_task_il = float(100 * counts[:, 3].sum() / n.sum())
    if conditioned:
        res.class_il = [math.nan] * T
        res.class_il_topk = [math.nan] * T
    else:
        res.class_il = (100 * counts[:, 1] / n).tolist()
        res.class_il_topk = (100 * counts[:, 2] / n).tolist()
        res.seen_class_il = float(100 * counts[:, 1].sum() / n.sum())
        res.seen_class_il_topk = float(100 * counts[:, 2].sum() / n.sum())
        for j, name in enumerate(names):
            res.extra[name] = _accuracies(counts[:, 0], counts[:, 4 + 3 * j: 7 + 3 * j])
    return res
