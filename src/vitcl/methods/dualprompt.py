"""DualPrompt (Wang et al., ECCV 2022) on a frozen pretrained ViT (docs/methods/dualprompt.md).

Prefix tuning at two depths: a G(eneral)-prompt shared by all tasks at the first blocks (0, 1) and one E(xpert)-
prompt per task with a learnable key at the next ones (2, 3, 4). A prompt of length L at block i is a pair of
(L, D) tensors, the keys and values put before that block's own keys and values in its attention. Training task t
uses E-prompt t and pulls its key k_t towards the query (the frozen ViT's class token): loss = CE over task t's
classes (old logits masked) + lambda * mean_b (1 - cos(q_b, k_t)). At inference each image takes the E-prompt whose
key is nearest its query. The classifier reads the class token. Trainable: the G-prompt, the current E-prompt and
key, the current head; the backbone, the earlier E-prompts, keys and heads stay as they were.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import GrowingHead, create_backbone
from ..models.prompts import cosine_to_keys, freeze, mask_old_classes, require_token_vit, select_top, surrogate_loss
from .base import Method, MethodOptions, register_method

Prefix = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DualPromptOptions(MethodOptions):
    g_length: int = 5
    g_layers: list[int] = field(default_factory=lambda: [0, 1])
    e_length: int = 5  # dualprompt-pytorch: 5 for CIFAR-100, 20 for ImageNet-R
    e_layers: list[int] = field(default_factory=lambda: [2, 3, 4])
    pull_coeff: float = 1.0  # dualprompt-pytorch's CIFAR and ImageNet-R configs; LAMDA-PILOT's json: 0.1
    init_from_previous: bool = True  # a new E-prompt starts as a copy of the last one (shared_prompt_pool)
    # inference by the reference's batch-wise vote makes an image's prediction depend on its test batch
    batchwise_eval: bool = False
    train_mask: bool = True

    def validate(self, key: str) -> None:
        for name in ("g_length", "e_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if not self.e_layers:
            raise ConfigError(f"{key}.e_layers: expected at least one block index for the E-prompts")
        for name in ("g_layers", "e_layers"):
            layers = getattr(self, name)
            if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
                raise ConfigError(f"{key}.{name}: expected distinct block indices >= 0, got {layers}")
        both = sorted(set(self.g_layers) & set(self.e_layers))
        if both:
            raise ConfigError(f"{key}.e_layers: blocks {both} also hold the G-prompt; expected disjoint layers")
        if self.pull_coeff < 0:
            raise ConfigError(f"{key}.pull_coeff: expected a weight >= 0, got {self.pull_coeff}")


class DualPromptModel(nn.Module):
    def __init__(self, backbone: nn.Module, opts: DualPromptOptions):
        super().__init__()
        self.dim = dim = int(cast(int, backbone.num_features))
        self.backbone, self.head = backbone, GrowingHead(dim)
        self.g_layers, self.e_layers = list(opts.g_layers), list(opts.e_layers)
        self.e_length = opts.e_length
        # (layer, key/value, length, D), uniform in [-1, 1] as the reference
        self.g_prompt = nn.Parameter(torch.empty(len(self.g_layers), 2, opts.g_length, dim).uniform_(-1, 1))
        self.e_prompts, self.e_keys = nn.ParameterList(), nn.ParameterList()
        freeze(self.backbone)

    def add_task(self, copy_previous: bool) -> None:
        p = torch.empty(len(self.e_layers), 2, self.e_length, self.dim, device=self.g_prompt.device)
        with torch.no_grad():
            if copy_previous and len(self.e_prompts):
                p.copy_(self.e_prompts[-1])
            else:
                p.uniform_(-1, 1)
        self.e_prompts.append(nn.Parameter(p))
        self.e_keys.append(nn.Parameter(torch.empty(self.dim, device=p.device).uniform_(-1, 1)))

    def keys(self) -> torch.Tensor:
        return torch.stack(list(self.e_keys))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(x)

    def prefixes(self, idx: torch.Tensor) -> list[Prefix | None]:
        """Block i's (keys, values) prefix, each (B, L, D): the G-prompt's, or the E-prompt idx[b]'s."""
        B = idx.shape[0]
        chosen = torch.stack(list(self.e_prompts))[idx]  # (B, n_e, 2, L, D)
        out: list[Prefix | None] = [None] * (max(self.g_layers + self.e_layers) + 1)
        for j, i in enumerate(self.g_layers):
            g = self.g_prompt[j]
            out[i] = (g[0].expand(B, -1, -1), g[1].expand(B, -1, -1))
        for j, i in enumerate(self.e_layers):
            out[i] = (chosen[:, j, 0], chosen[:, j, 1])
        return out

    def features(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        b = cast(Any, self.backbone)
        return b.forward_blocks(b.embed_tokens(x), self.prefixes(idx))[:, 0]

    def select(self, q: torch.Tensor, batchwise: bool) -> torch.Tensor:
        """(B,) the E-prompt whose key is nearest each query (or the batch's most frequent choice)."""
        return select_top(cosine_to_keys(q, self.keys()), 1, batchwise)[:, 0]

    def forward(self, x: torch.Tensor, task: int | None = None,
                batchwise: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, query, E-prompt per image): task t's E-prompt when given (training), else the nearest key's."""
        q = self.query(x)
        idx = self.select(q, batchwise) if task is None else torch.full_like(q[:, 0], task, dtype=torch.long)
        return self.head(self.features(x, idx)), q, idx

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self


@register_method("dualprompt")
class DualPrompt(Method[DualPromptOptions]):
    settings = frozenset({"class-il"})
    hard_labels = True

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        require_token_vit(cfg)
        o, depth = cfg.method, cfg.model.depth
        for name in ("g_layers", "e_layers"):
            if any(i >= depth for i in getattr(o, name)):
                raise ConfigError(f"method.{name}: the ViT has blocks 0..{depth - 1}, got {getattr(o, name)}")

    def build_model(self) -> nn.Module:
        backbone = create_backbone(self.cfg.model, self.scenario.train.image_size, self.scenario.train.channels)
        return DualPromptModel(backbone, self.opts)

    def begin_task(self, task):
        super().begin_task(task)
        self.model.add_task(self.opts.init_from_previous)
        self.model.head.add_task(task.num_classes).to(self.device)

    def setup_phase(self, phase, task):
        m = self.model
        m.train()
        for p in m.parameters():
            p.requires_grad_(False)
        t = task.index
        for p in [m.g_prompt, m.e_prompts[t], m.e_keys[t], *m.head.heads[t].parameters()]:
            p.requires_grad_(True)

    def loss(self, batch, phase, task):
        o = self.opts
        logits, q, idx = self.model(batch.x, task=task.index)
        ce = F.cross_entropy(mask_old_classes(logits, task.offset) if o.train_mask else logits, batch.y)
        pull = surrogate_loss(q, self.model.keys(), idx[:, None])
        return ce + o.pull_coeff * pull, {"ce": ce.detach(), "surrogate": pull.detach()}

    def logits(self, x, task=None):
        return self.model(x, batchwise=self.opts.batchwise_eval)[0]

    def embed(self, x):
        return self.model.query(x)
