"""APER, formerly ADAM (Zhou et al., "Revisiting class-incremental learning with pre-trained models:
generalizability and adaptivity are all you need", IJCV 2024; docs/methods/aper.md).

Task 0 only: a parameter-efficient module (`peft`: AdaptFormer adapters, shallow or deep VPT, or SSF) is trained on
the frozen pretrained ViT with a cosine head over the task's classes (sigma * cos, sigma learnt from 1), by
cross-entropy; then it is frozen too. Every task t (task 0 after its training): with f the pretrained model's
embedding and g the adapted model's (the same backbone, the module switched off / on), each new class c gets the
prototype
    p_c = mean over c's training images (test transform) of [f(x), g(x)]      (2d)
and an image is scored by cos([f(x), g(x)], p_c) over the seen classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import create_backbone
from ..models.adapters import AdaptedBlock, add_adapters, blocks_of, set_active_adapter
from ..models.peft import PromptInit, VisualPrompts, add_ssf, set_ssf_active, ssf_parameters, vpt_features
from .base import Method, MethodOptions, ParamCount, register_method
from .ease import CosineHead
from .prototypes import Prototypes, class_feature_means

Peft = Literal["adapter", "vpt-shallow", "vpt-deep", "ssf"]


@dataclass
class AperOptions(MethodOptions):
    peft: Peft = "adapter"
    bottleneck: int = 64  # adapter width (the reference's ffn_num)
    adapter_scale: float = 0.1
    adapter_dropout: float = 0.1
    prompt_length: int = 5  # VPT tokens per set (prompt_token_num)
    prompt_init: PromptInit = "zeros"  # LAMDA-PILOT's backbone/vpt.py; "xavier": its vit_adapter.py's vpt_on

    def validate(self, key: str) -> None:
        if self.bottleneck < 1:
            raise ConfigError(f"{key}.bottleneck: expected a width >= 1, got {self.bottleneck}")
        if not 0 <= self.adapter_dropout < 1:
            raise ConfigError(f"{key}.adapter_dropout: expected a rate in [0, 1), got {self.adapter_dropout}")
        if self.prompt_length < 1:
            raise ConfigError(f"{key}.prompt_length: expected >= 1 prompt token, got {self.prompt_length}")


class AperModel(nn.Module):
    """The ViT (frozen; with the first session's module once task 0 begins), the first session's training head
    and the prompts when the module is VPT. `pretrained(x)` and `adapted(x)` are the two embeddings."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.head: CosineHead | None = None
        self.prompts: VisualPrompts | None = None
        self.peft: str | None = None  # set when the module is added

    @property
    def dim(self) -> int:
        return int(cast(int, self.backbone.num_features))

    def add_peft(self, opts: AperOptions) -> None:
        vit, self.peft = self.backbone, opts.peft
        device = next(vit.parameters()).device
        if opts.peft == "adapter":
            set_active_adapter(vit, add_adapters(vit, opts.bottleneck, opts.adapter_scale, opts.adapter_dropout))
        elif opts.peft == "ssf":
            add_ssf(vit)
        else:
            layers = len(blocks_of(vit)) if opts.peft == "vpt-deep" else 1
            self.prompts = VisualPrompts(layers, opts.prompt_length, self.dim, opts.prompt_init).to(device)
        self.requires_grad_(False)

    def peft_parameters(self) -> list[nn.Parameter]:
        if self.peft == "adapter":
            return [p for b in blocks_of(self.backbone) for p in cast(AdaptedBlock, b).adapters[0].parameters()]
        if self.peft == "ssf":
            return ssf_parameters(self.backbone)
        return [] if self.prompts is None else list(self.prompts.parameters())

    def _switch(self, on: bool) -> None:
        if self.peft == "adapter":
            set_active_adapter(self.backbone, 0 if on else None)
        elif self.peft == "ssf":
            set_ssf_active(self.backbone, on)

    def pretrained(self, x: torch.Tensor) -> torch.Tensor:
        self._switch(False)
        try:
            return self.backbone(x)
        finally:
            self._switch(True)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        if self.peft is None:
            raise RuntimeError("aper: the first session's module is not there yet (begin_task(0) adds it)")
        if self.prompts is not None:
            return vpt_features(self.backbone, x, self.prompts)
        return self.backbone(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[f(x), g(x)]: (B, 2d), the pretrained model's embedding first (LAMDA-PILOT's branch order)."""
        return torch.cat([self.pretrained(x), self.adapted(x)], dim=1)

    def train(self, mode: bool = True) -> AperModel:
        """The backbone stays in eval mode; only a module that trains follows `mode` (the adapters' dropout)."""
        super().train(mode)
        if mode:
            self.backbone.eval()
            if self.peft == "adapter":
                for b in blocks_of(self.backbone):
                    adapter = cast(AdaptedBlock, b).adapters[0]
                    adapter.train(any(p.requires_grad for p in adapter.parameters()))
        return self


@register_method("aper")
class Aper(Method[AperOptions]):
    settings = frozenset({"class-il"})
    hard_labels = True  # the first session's head sees its task's classes only

    def __init__(self, cfg, scenario, device):
        super().__init__(cfg, scenario, device)
        self.prototypes = Prototypes()

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.model.name != "vit":
            raise ConfigError(f"model.name: aper tunes a ViT's blocks with {cfg.method.peft}; expected 'vit', got "
                              f"'{cfg.model.name}'")

    def build_model(self) -> nn.Module:
        return AperModel(create_backbone(self.cfg.model, self.scenario.train.image_size,
                                         self.scenario.train.channels))

    @property
    def net(self) -> AperModel:
        return cast(AperModel, self.model)

    def begin_task(self, task):
        super().begin_task(task)
        m = self.net
        if task.index == 0:
            m.add_peft(self.opts)
            m.head = CosineHead(m.dim, task.num_classes).to(self.device)
        m.requires_grad_(False)  # only the first session's module and head train (setup_phase)

    def phases(self, task):
        return super().phases(task) if task.index == 0 else []

    def setup_phase(self, phase, task):
        m = self.net
        m.requires_grad_(False)
        for p in m.peft_parameters():
            p.requires_grad_(True)
        cast(CosineHead, m.head).requires_grad_(True)
        m.train()

    def loss(self, batch, phase, task):
        m = self.net
        logits = cast(CosineHead, m.head)(m.adapted(batch.x))
        return F.cross_entropy(logits, batch.y - task.offset), {}

    def embed(self, x):
        return self.net.features(x)

    def consolidate(self, task, ctx):
        m = self.net
        m.requires_grad_(False)  # the module and head are frozen from here on
        m.eval()
        labels = self.scenario.train_labels[task.train_idx]
        classes, means = class_feature_means(ctx, task.train_idx, labels, self.embed)
        self.prototypes.set(classes, means, task.end)

    def logits(self, x, task=None):
        return self.prototypes(self.embed(x))

    def extra_state(self) -> dict:
        return {"prototypes": self.prototypes.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.prototypes.load_state_dict(state["prototypes"], self.device)

    def count_parameters(self) -> ParamCount:
        """The backbone (shared by both embeddings) with the first session's module, its head while task 0 trains,
        and the prototype table (seen classes x 2d)."""
        m = self.net
        params: list[Any] = list(m.backbone.parameters()) + list(m.prompts.parameters() if m.prompts else [])
        if m.head is not None and self.task_index == 0:
            params += list(m.head.parameters())
        total = sum(p.numel() for p in params) + self.seen * 2 * m.dim
        return ParamCount(float(total), float(sum(p.numel() for p in params if p.requires_grad)))
