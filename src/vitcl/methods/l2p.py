"""L2P, Learning to Prompt (Wang et al., CVPR 2022), on a frozen pretrained ViT (docs/methods/l2p.md).

A pool of M prompts P_i (L x D each) with keys k_i. The query q(x) is the frozen ViT's class token (a forward
without prompts); the N keys most cosine-similar to q (during training the N chosen most often over the batch, as
the reference does) select their prompts, which go into the token sequence after the class token; the classifier
reads the mean of the prompt tokens' outputs. Loss: cross-entropy over the current task's classes (the old ones'
logits masked, the reference's train_mask) + lambda * mean_b sum_j (1 - cos(q_b, k_{s_bj})). The backbone is frozen;
prompts, keys and the current task's head train.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import GrowingHead, create_backbone
from ..models.prompts import (
    PromptPool,
    freeze,
    insert_prompts,
    mask_old_classes,
    require_token_vit,
    select_top,
    surrogate_loss,
)
from .base import Method, MethodOptions, register_method


@dataclass
class L2POptions(MethodOptions):
    pool_size: int = 10  # M
    length: int = 5  # L, tokens per prompt
    top_k: int = 5  # N, prompts per image
    pull_coeff: float = 0.1  # lambda of the surrogate (matching) loss
    batchwise: bool = True  # training: the N prompts chosen most often in the batch, for every image (reference)
    # inference by the same vote makes an image's prediction depend on its test batch; off: each image its own
    batchwise_eval: bool = False
    head: Literal["prompt", "token"] = "prompt"  # mean of the prompt tokens' outputs, or the class token
    train_mask: bool = True  # training logits of earlier tasks' classes masked (-inf)

    def validate(self, key: str) -> None:
        for name in ("pool_size", "length", "top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.top_k > self.pool_size:
            raise ConfigError(f"{key}.top_k: expected at most pool_size ({self.pool_size}) prompts, got {self.top_k}")
        if self.pull_coeff < 0:
            raise ConfigError(f"{key}.pull_coeff: expected a weight >= 0, got {self.pull_coeff}")


class L2PModel(nn.Module):
    def __init__(self, backbone: nn.Module, opts: L2POptions):
        super().__init__()
        dim = int(cast(int, backbone.num_features))
        self.backbone, self.head = backbone, GrowingHead(dim)
        self.pool = PromptPool(opts.pool_size, (opts.length, dim), dim)  # uniform [0, 1), as the reference
        self.top_k, self.readout = opts.top_k, opts.head
        freeze(self.backbone)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(x)

    def features(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The pooled output with the prompts `idx` (B, N) inserted."""
        b = cast(Any, self.backbone)
        prompts = self.pool.prompts[idx].flatten(1, 2)  # (B, N*L, D)
        out = b.forward_blocks(insert_prompts(b, b.embed_tokens(x), prompts))
        n = b.num_prefix_tokens
        return out[:, n:n + prompts.shape[1]].mean(1) if self.readout == "prompt" else out[:, 0]

    def forward(self, x: torch.Tensor, batchwise: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits over the seen classes, query, selected indices)."""
        q = self.query(x)
        idx = select_top(self.pool.similarity(q), self.top_k, batchwise)
        return self.head(self.features(x, idx)), q, idx

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: dropout and drop-path stay off
        return self


@register_method("l2p")
class L2P(Method[L2POptions]):
    settings = frozenset({"class-il"})
    hard_labels = True

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        require_token_vit(cfg)

    def build_model(self) -> nn.Module:
        backbone = create_backbone(self.cfg.model, self.scenario.train.image_size, self.scenario.train.channels)
        return L2PModel(backbone, self.opts)

    def begin_task(self, task):
        super().begin_task(task)
        self.model.head.add_task(task.num_classes).to(self.device)

    def setup_phase(self, phase, task):
        m = self.model
        m.train()
        for p in m.parameters():
            p.requires_grad_(False)
        for p in [*m.pool.parameters(), *m.head.heads[task.index].parameters()]:
            p.requires_grad_(True)

    def loss(self, batch, phase, task):
        o = self.opts
        logits, q, idx = self.model(batch.x, batchwise=o.batchwise)
        ce = F.cross_entropy(mask_old_classes(logits, task.offset) if o.train_mask else logits, batch.y)
        pull = surrogate_loss(q, self.model.pool.keys, idx)
        return ce + o.pull_coeff * pull, {"ce": ce.detach(), "surrogate": pull.detach()}

    def logits(self, x, task=None):
        return self.model(x, batchwise=self.opts.batchwise_eval)[0]

    def embed(self, x):
        return self.model.query(x)
