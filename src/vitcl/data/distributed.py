"""torchrun support: process group from the environment, gradient averaging, gathers. All no-ops on 1 process."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> tuple[int, int]:
    """Start the process group when launched by torchrun; returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return rank(), world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_gradients(params: list[torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor:
    """Average .grad over ranks in one flat bucket (methods may run several forwards, so no DDP wrapper);
    `extra` (a scalar, e.g. the step loss) rides along and is returned averaged, as a tensor on its device (no
    host synchronisation). Missing grads count as 0."""
    device = params[0].device if params else torch.device("cpu")
    extra = torch.zeros((), device=device) if extra is None else extra.detach().float()
    if not dist.is_initialized():
        return extra
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.flatten().float() for g in grads] + [extra.view(1).to(device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[-1]


def average_buffers(module: torch.nn.Module) -> None:
    """Average the running statistics of the batch norms (every buffer named running_mean or running_var) over ranks
    in one bucket. Without it each rank keeps the statistics of its own shares of the batches, and the ranks
    evaluate, select exemplars and checkpoint with different models (timm's distribute_bn 'reduce'; DDP's
    broadcast_buffers would keep rank 0's instead). Other buffers (projections, prototypes) are the same on every
    rank by construction and are left untouched."""
    if not dist.is_initialized():
        return
    buffers = [b for name, b in module.named_buffers()
               if name.rsplit(".", 1)[-1] in ("running_mean", "running_var") and b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().flatten().float() for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset: offset + b.numel()].view_as(b))
        offset += b.numel()


def all_gather_rows(t: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows (rank order); counts[r] is the number of rows rank r holds."""
    if not dist.is_initialized():
        return t
    n_max = max(counts)
    padded = t.new_zeros((n_max,) + tuple(t.shape[1:]))
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] on one process)."""
    if not dist.is_initialized():
        return [obj]
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts
