"""The DyTox network: a shared ConViT encoder and task-attention decoder, one task token and one classifier per
task, and the training-only divergence head.

    patches = encoder(x)                       (B, N, C)   computed once
    e       = decoder([theta_1 .. theta_T], patches)  (B, T, C)   all task tokens in one batched call per TAB
    logits  = concat_t Clf_t(e_t)              (B, |C_1| + ... + |C_T|)   Clf_t = LayerNorm + Linear, own classes
    div     = Clf_div(e_T)                     (B, |C_T| + 1)   only while training task T >= 2

Two switches give the paper's model ablation (docs/methods/dytox.md#model-ablation):
- `task_tokens="shared"`: no token expansion; the one class token serves every task, so the decoder runs once
  on one token whatever the number of tasks (e is (B, 1, C)).
- `heads="shared"`: one classifier Clf = LayerNorm + Linear over all seen classes on the flattened embedding
  (e_1 with a shared token, [e_1, ..., e_T] concatenated otherwise), replaced by a wider one at every task:
  `shared_head_growth="keep"` copies the old LayerNorm entries and the old block of the Linear into it (as the
  public code's `Classifier.add_new_outputs` grows the plain transformer's head), `"reset"` starts it afresh
  (as its DyTox wrapper does with `ind_clf=''`).
"""
from __future__ import annotations

from typing import Literal, cast

import torch
from torch import nn

from .convit import ConViT
from .heads import TaskHead
from .layers import trunc_normal_


class DyToxNet(nn.Module):
    def __init__(self, convit: ConViT, task_tokens: Literal["expand", "shared"] = "expand",
                 heads: Literal["independent", "shared"] = "independent",
                 shared_head_growth: Literal["keep", "reset"] = "keep"):
        super().__init__()
        self.embed_dim = convit.embed_dim
        self.encoder = convit.encoder
        self.decoder = convit.decoder
        self.task_tokens = nn.ParameterList([convit.cls_token])  # theta_1 is ConViT's class token
        self.heads = nn.ModuleList()  # one per task, or (heads="shared") the one classifier over all seen classes
        self.head_div: TaskHead | None = None
        self.shared_token = task_tokens == "shared"
        self.shared_head = heads == "shared"
        self.shared_head_growth = shared_head_growth
        self.class_counts: list[int] = []  # classes of each task so far

    @property
    def num_tasks(self) -> int:
        return len(self.class_counts)

    def add_task(self, num_classes: int, divergence: bool = True) -> None:
        """A new token (trunc-normal 0.02; the public code's deepcopy-then-reinit amounts to that; none with a
        shared token) and a new classifier (PyTorch's default init; with a shared head, the wider replacement);
        the divergence head is rebuilt from scratch for tasks t >= 2."""
        device = self.task_tokens[0].device
        if self.class_counts and not self.shared_token:
            token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, device=device))
            trunc_normal_(token, std=0.02)
            self.task_tokens.append(token)
        self.class_counts.append(num_classes)
        if self.shared_head:
            self._grow_shared_head(device)
        else:
            self.heads.append(TaskHead(self.embed_dim, num_classes, norm=True).to(device))
        self.head_div = (TaskHead(self.embed_dim, num_classes + 1, norm=True).to(device)
                         if divergence and self.num_tasks > 1 else None)

    def _grow_shared_head(self, device: torch.device) -> None:
        head = TaskHead(self.embed_dim * len(self.task_tokens), sum(self.class_counts), norm=True).to(device)
        if self.heads and self.shared_head_growth == "keep":
            old = cast(TaskHead, self.heads[0])
            n_in, n_out = old.fc.in_features, old.fc.out_features
            new_norm, old_norm = cast(nn.LayerNorm, head.norm), cast(nn.LayerNorm, old.norm)
            with torch.no_grad():
                head.fc.weight[:n_out, :n_in] = old.fc.weight
                head.fc.bias[:n_out] = old.fc.bias
                new_norm.weight[:n_in] = old_norm.weight
                new_norm.bias[:n_in] = old_norm.bias
        self.heads = nn.ModuleList([head])

    def tokens(self) -> torch.Tensor:
        return torch.cat(list(self.task_tokens), dim=1)  # (1, T, C); (1, 1, C) with a shared token

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C): the task embeddings e_1 .. e_T (raw TAB outputs; no final norm); (B, 1, C) shared token."""
        tokens = self.tokens()
        if tokens.shape[1] > 1:  # a compiled decoder: one graph for every task count from 2 on, not one per task
            torch._dynamo.maybe_mark_dynamic(tokens, 1)
        return self.decoder(tokens, self.encoder(x))

    def compile_modules(self) -> list[nn.Module]:
        """What `run.compile` compiles: the encoder and the decoder, which every task shares; the tokens and heads
        that grow per task stay eager."""
        return [self.encoder, self.decoder]

    def forward_head(self, emb: torch.Tensor) -> torch.Tensor:
        """Logits over all seen classes: each task's classifier on its own token (on the one token when it is
        shared), or the shared classifier on all embeddings concatenated."""
        if self.shared_head:
            return self.heads[0](emb.flatten(1))
        return torch.cat([head(emb[:, 0 if self.shared_token else i]) for i, head in enumerate(self.heads)], dim=1)

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
