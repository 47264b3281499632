"""Prompt machinery for frozen pretrained ViTs (L2P, DualPrompt; docs/methods/l2p.md, docs/methods/dualprompt.md):
a pool of prompts with one learnable key each, cosine matching of a query (the frozen model's class token) against
the keys, top-N selection with the reference's batch-wise majority vote, prompts prepended to the token sequence
(prompt tuning) and (keys, values) prefixes per block (prefix tuning)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from ..errors import ConfigError


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """x / max(||x||, sqrt(eps)) along `dim`: the reference's rsqrt(max(sum x^2, eps)) form."""
    return x * torch.rsqrt(x.pow(2).sum(dim, keepdim=True).clamp(min=eps))


def cosine_to_keys(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, D) queries, (M, D) keys -> (B, M) cosine similarities."""
    return l2_normalize(query.float()) @ l2_normalize(keys.float()).t()


def select_top(similarity: torch.Tensor, k: int, batchwise: bool) -> torch.Tensor:
    """(B, M) similarities -> (B, k) selected indices: each row's k most similar keys, or with `batchwise` the k
    indices chosen most often over the batch, the same for every row (the reference's majority vote; ties go to
    the lower index, where the reference leaves them to topk)."""
    idx = similarity.topk(k, dim=1).indices
    if not batchwise:
        return idx
    flat = idx.flatten()  # bincount would read its largest index on the host (a device sync): a scatter does not
    counts = torch.zeros(similarity.shape[1], dtype=torch.long, device=idx.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    order = torch.sort(counts, descending=True, stable=True).indices
    return order[:k].expand(similarity.shape[0], -1)


def surrogate_loss(query: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """L2P's matching loss: the batch mean of sum_j (1 - cos(q_b, k_{idx[b, j]})). The reference subtracts
    sum cos / B instead; the two differ by the constant N, so their gradients are the same."""
    cos = (l2_normalize(query.float())[:, None, :] * l2_normalize(keys.float())[idx]).sum(-1)  # (B, N)
    return (1.0 - cos).sum(1).mean()


class PromptPool(nn.Module):
    """`size` prompts, each of shape `shape`, with one key of `key_dim` each; both drawn uniformly from `init`."""

    def __init__(self, size: int, shape: Sequence[int], key_dim: int, init: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(size, *shape))
        self.keys = nn.Parameter(torch.empty(size, key_dim))
        for p in (self.prompts, self.keys):
            nn.init.uniform_(p, *init)

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        return cosine_to_keys(query, self.keys)


def insert_prompts(vit: nn.Module, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Put (B, P, D) prompts after the class token of `vit.embed_tokens`' output. As in l2p-pytorch, a prompt gets
    the class token's position embedding (its checkpoint filter extends the class slot over the prompts) and the
    same position dropout."""
    v = cast(Any, vit)
    n = v.num_prefix_tokens
    pos = v.pos_embed[:, :n] if n else v.pos_embed.new_zeros(1, 1, prompts.shape[-1])
    prompts = v.pos_drop(prompts.to(tokens.dtype) + pos[:, :1])
    return torch.cat([tokens[:, :n], prompts, tokens[:, n:]], dim=1)


def freeze(module: nn.Module) -> None:
    """requires_grad off and eval mode (dropout, drop-path off), for a backbone that stays as pretrained."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def mask_old_classes(logits: torch.Tensor, offset: int) -> torch.Tensor:
    """The reference's train_mask in class-IL: logits of the classes before this task's set to -inf."""
    if offset == 0:
        return logits
    keep = torch.arange(logits.shape[1], device=logits.device) >= offset
    return logits.masked_fill(~keep, float("-inf"))


def require_token_vit(cfg) -> None:
    """The prompt methods read the class token of our `vit` backbone and feed its blocks themselves."""
    name = cfg.method.name
    if cfg.model.name != "vit":
        raise ConfigError(f"model.name: {name} prompts a ViT's blocks; expected 'vit', got '{cfg.model.name}'")
    if cfg.model.pool != "token":
        raise ConfigError(f"model.pool: {name}'s query is the frozen ViT's class token; expected 'token', "
                          f"got '{cfg.model.pool}'")
