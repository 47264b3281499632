"""CODA-Prompt (Smith et al., CVPR 2023), class-incremental without memory (docs/methods/coda-prompt.md).

A frozen pretrained ViT; the query of an image is the frozen model's class-token feature (no prompts). At each
prompted block (the reference's blocks 0-4) the prompt sum_m cos(q * A_m, K_m) P_m (models/coda_prompt.py) is put
before the block's keys and values, its first half as keys, its second as values. Each task owns pool_size / T
components per block, drawn by Gram-Schmidt orthogonal to the earlier tasks' ones, which stay frozen. The loss of
a batch is CE over the current task's classes (the reference masks the old classes' logits to -inf) plus
ortho_mu * sum over blocks of the orthogonality penalties of P, K and A.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..models import GrowingHead, create_backbone
from ..models.coda_prompt import CodaPrompt
from ..models.registry import MODELS
from ..models.vit import VisionTransformer
from .base import Method, MethodOptions, register_method
from .losses import task_cross_entropy


@dataclass
class CodaPromptOptions(MethodOptions):
    pool_size: int = 100  # components per prompted block, over all tasks (reference: 100)
    length: int = 8  # prompt length per component; half keys, half values (reference: 8)
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # prompted blocks (reference: 0-4)
    # weight of the orthogonality penalty; 0 in the reference since its Gram-Schmidt initialisation (its README)
    # and in LAMDA-PILOT's exps/coda_prompt.json; the paper's first code release used 0.1 (times 1e-6)
    ortho_mu: float = 0.0

    def validate(self, key: str) -> None:
        if self.pool_size < 1:
            raise ConfigError(f"{key}.pool_size: expected a positive number of components, got {self.pool_size}")
        if self.length < 2 or self.length % 2:
            raise ConfigError(f"{key}.length: expected an even prompt length >= 2 (keys and values halves), "
                              f"got {self.length}")
        if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ConfigError(f"{key}.layers: expected distinct block indices >= 0, got {self.layers}")
        if self.ortho_mu < 0:
            raise ConfigError(f"{key}.ortho_mu: expected a weight >= 0, got {self.ortho_mu}")


class PromptedViT(nn.Module):
    def __init__(self, vit: VisionTransformer, prompt: CodaPrompt, head: GrowingHead):
        super().__init__()
        self.vit, self.prompt, self.head = vit, prompt, head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        with torch.no_grad():  # the frozen backbone: its tokens and the query need no gradient
            tokens = vit.embed_tokens(x)
            q = vit.forward_head(vit.forward_blocks(tokens))
        prefixes = self.prompt.prefixes(q, len(vit.blocks))
        return vit.forward_head(vit.forward_blocks(tokens, prefixes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_method("coda-prompt")
class CodaPromptMethod(Method[CodaPromptOptions]):
    settings = frozenset({"class-il"})

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        m, o = cfg.model, cfg.method
        model = MODELS.get(m.name, "model.name")
        if not (isinstance(model, type) and issubclass(model, VisionTransformer)):
            raise ConfigError(f"model.name: coda-prompt puts prefix prompts into a 'vit' backbone, got '{m.name}'")
        if m.pool != "token":
            raise ConfigError(f"model.pool: coda-prompt's query and features are the class token; set "
                              f"model.pool=token, got '{m.pool}'")
        if max(o.layers) >= m.depth:
            raise ConfigError(f"method.layers: block {max(o.layers)} does not exist in a {m.depth}-block ViT")
        if o.pool_size > m.embed_dim:
            raise ConfigError(f"method.pool_size: {o.pool_size} orthogonal keys do not fit in {m.embed_dim} "
                              f"dimensions (model.embed_dim); expected at most {m.embed_dim}")
        if m.embed_dim % m.num_heads:
            raise ConfigError(f"model.num_heads: {m.num_heads} does not divide model.embed_dim {m.embed_dim}")

    def build_model(self) -> nn.Module:
        n_tasks = len(self.scenario)
        if self.opts.pool_size < n_tasks:
            raise ConfigError(f"method.pool_size: {self.opts.pool_size} components cannot be shared among "
                              f"{n_tasks} tasks; expected at least one per task")
        vit = create_backbone(self.cfg.model, self.scenario.train.image_size, self.scenario.train.channels)
        if not isinstance(vit, VisionTransformer):
            raise ConfigError(f"model.name: coda-prompt needs the 'vit' backbone, got '{self.cfg.model.name}'")
        d = vit.num_features
        # the reference's share per task: int(pool / T), the remainder never used
        prompt = CodaPrompt(d, d, self.opts.pool_size // n_tasks, self.opts.length, self.opts.layers)
        return PromptedViT(vit, prompt, GrowingHead(d))

    @property
    def net(self) -> PromptedViT:
        return self.model  # type: ignore[return-value]

    def begin_task(self, task):
        super().begin_task(task)
        self.net.prompt.add_task(self.device)
        self.net.head.add_task(task.num_classes).to(self.device)
        self.freeze()

    def freeze(self) -> None:
        """Only the newest task's components and head train; the backbone stays in eval mode (no dropout)."""
        net = self.net
        net.requires_grad_(False)
        for p in net.prompt.current_parameters():
            p.requires_grad_(True)
        net.head.heads[-1].requires_grad_(True)

    def setup_phase(self, phase, task):
        self.freeze()
        self.model.train()
        self.net.vit.eval()

    def loss(self, batch, phase, task):
        logits = self.net(batch.x)
        ce = task_cross_entropy(logits, batch, task.offset, "task")
        logs = {"ce": ce.detach()}
        if self.opts.ortho_mu > 0:
            ortho = self.opts.ortho_mu * self.net.prompt.ortho_loss()
            logs["ortho"] = ortho.detach()
            return ce + ortho, logs
        return ce, logs

    def logits(self, x, task=None):
        return self.net.head(self.net.features(x), task)

    def embed(self, x):
        return self.net.features(x)

    def reference_count(self) -> float | None:
        """One frozen backbone with one linear head over every class of the run."""
        n = sum(p.numel() for p in self.net.vit.parameters())
        return float(n + (self.net.vit.num_features + 1) * self.scenario.num_classes)
