"""The DyTox network: a shared ConViT encoder and task-attention decoder, one task token and one classifier per
task, and the training-only divergence head.

    patches = encoder(x)                       (B, N, C)   computed once
    e       = decoder([theta_1 .. theta_T], patches)  (B, T, C)   all task tokens in one batched call per TAB
    logits  = concat_t Clf_t(e_t)              (B, |C_1| + ... + |C_T|)   Clf_t = LayerNorm + Linear, own classes
    div     = Clf_div(e_T)                     (B, |C_T| + 1)   only while training task T >= 2
"""
from __future__ import annotations

import torch
from torch import nn

from .convit import ConViT
from .heads import TaskHead
from .layers import trunc_normal_


class DyToxNet(nn.Module):
    def __init__(self, convit: ConViT):
        super().__init__()
        self.embed_dim = convit.embed_dim
        self.encoder = convit.encoder
        self.decoder = convit.decoder
        self.task_tokens = nn.ParameterList([convit.cls_token])  # theta_1 is ConViT's class token
        self.heads = nn.ModuleList()
        self.head_div: TaskHead | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def add_task(self, num_classes: int, divergence: bool = True) -> None:
        """A new token (trunc-normal 0.02; the public code's deepcopy-then-reinit amounts to that) and a new
        classifier (PyTorch's default init); the divergence head is rebuilt from scratch for tasks t >= 2."""
        device = self.task_tokens[0].device
        if self.heads:
            token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, device=device))
            trunc_normal_(token, std=0.02)
            self.task_tokens.append(token)
        self.heads.append(TaskHead(self.embed_dim, num_classes, norm=True).to(device))
        self.head_div = (TaskHead(self.embed_dim, num_classes + 1, norm=True).to(device)
                         if divergence and len(self.heads) > 1 else None)

    def tokens(self) -> torch.Tensor:
        return torch.cat(list(self.task_tokens), dim=1)  # (1, T, C)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C): the task embeddings e_1 .. e_T (raw TAB outputs; no final norm)."""
        return self.decoder(self.tokens(), self.encoder(x))

    def forward_head(self, emb: torch.Tensor) -> torch.Tensor:
        """Logits over all seen classes, each task's classifier on its own token."""
        return torch.cat([head(emb[:, i]) for i, head in enumerate(self.heads)], dim=1)

    def forward_div(self, emb: torch.Tensor) -> torch.Tensor:
        if self.head_div is None:
            raise RuntimeError("the divergence head exists from the second task on")
        return self.head_div(emb[:, -1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def inference_modules(self) -> nn.Module:
        """Everything used at test time (the divergence head is not)."""
        return nn.ModuleDict({"encoder": self.encoder, "decoder": self.decoder, "task_tokens": self.task_tokens,
                              "heads": self.heads})
