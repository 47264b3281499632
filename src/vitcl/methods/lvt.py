"""LVT: Continual Learning with Lifelong Vision Transformer (Wang, Liu, Duan, Kong, Tao; CVPR 2022).

No official code exists. This reconstruction follows what the paper's text is known to say (through a Korean
summary, see `docs/methods/lvt.md`), two proxy codebases (an unofficial course-project implementation, and the authors'
later CVT code) for the loss skeleton and the memory rule, and fills the gaps with the choices listed below.
Every choice that has a plausible alternative is an option.

The parts
- Backbone (`models/lvt.py`): a hybrid ViT whose attention is *inter-task attention*,
  A = softmax(Q K_Wᵀ/√d + B), with a learnable external key matrix K_W (one key per token position, per head)
  and a learnable bias B (per head, N×N) in place of the input keys X·W_K.
- Dual classifier on the pooled feature f(x):
  * the injection classifier h_I, trained on the current task's data only (L_inject): it injects the new task
    into the backbone;
  * the accumulation classifier h_A, over all seen classes, trained on the memory (L_replay, L_distill) and on
    the current data with a decaying weight r(t) (L_accumulate); it is the one that predicts (class-IL and
    task-IL are scored from its logits, by the evaluator).
- Attention consolidation L_a: after each task, the importance of every K_W and B entry for that task is
  estimated from the gradients of the task's loss on its data; while learning later tasks, L_a penalises moving
  K_W and B away from their values at the end of the task, weighted by that importance.
- Confidence-aware memory: a class-balanced budget; within a class, the samples whose softmax probability of the
  true class is highest (`memory.selection: confidence`), stored with their logits for L_distill.

Loss of a step (a batch of the current task, plus an independent batch drawn from the memory):
    L = L_inject + γ·L_a + α·L_replay + β·L_distill + r(t)·L_accumulate,    r(t) = r0 · r_decay^t
with L_inject = CE(h_I(f(x)), y), L_accumulate = CE(h_A(f(x)), y) on the current batch, L_replay =
CE(h_A(f(x_m)), y_m) and L_distill = T²·KL(softmax(z_m/T) ‖ softmax(h_A(f(x_m))/T)) on the memory batch, z_m the
logits stored with the exemplar (only the classes seen when it was stored), T = 2.

Interpretation choices (and why)
1. Memory batch: each step draws its own batch from the memory (the engine's `memory_batch`, default the train
   batch size), as both proxy codebases do (they are Mammoth-style, like the DER++/ER baselines of the paper's
   tables); the current-task batch holds only current data. The memory is refreshed once per task, after it.
2. Injection classifier: by default a fresh linear head over the current task's classes at every task
   (`injection_classes: task`): it sees only current data, so only these classes can be learned by it. The
   unofficial code re-creates it over all seen classes instead (`injection_classes: seen`).
3. Importance: the gradient of the task's injection loss (the loss that belongs to that task alone;
   `importance_head: accumulation` uses h_A's instead) w.r.t. K_W and B, one gradient per batch of the task's
   training data (test transform, eval mode), over all batches. The quadratic form L_a = Σ Ω·(θ − θ*)² takes
   Ω = the mean gradient magnitude |g| (MAS-like: "the gradient values are the importance";
   `importance: squared` takes the mean squared gradient, an empirical Fisher as in EWC), divided by its maximum
   over all K_W and B entries (`importance_normalize`), so Ω ∈ [0, 1]: γ then does not depend on the loss scale,
   and the pull of L_a on any entry is at most 2γ·Δ, which keeps SGD stable (lr·2γ < 2). Normalising to mean 1
   instead diverged at lr 0.05 (the squared gradients are heavy-tailed, max ≈ 100-200 × mean); and max-normalised
   squared gradients leave the median entry at ~1e-5, i.e. protect a handful of entries, which is why the
   magnitude is the default. The option `consolidation: abs-inner` is the unofficial code's
   L_a = Σ_tensors |⟨ḡ, θ − θ*⟩| with ḡ the mean (signed) gradient, without its arbitrary ÷32.
   Only the last task's importance and parameters anchor L_a, as in the unofficial code; `importance_decay` > 0
   keeps a running sum Ω ← decay·Ω + Ω_t instead (online-EWC style).
4. Confidence for memory selection: the injection classifier's probability of the true class (unofficial code;
   the CVT code ranks by the CE loss of its current-data head, the same order). `confidence_head:
   accumulation` uses h_A. The stored logits are always h_A's (L_distill compares h_A with them).
5. L_distill: Hinton's temperature KD with the T² factor, restricted per exemplar to the classes seen when it was
   stored. The unofficial code's KL has its arguments swapped and recomputes z with the previous model; we keep
   the paper's "stored logits" reading.
6. Weights: α = β = γ = 2 and r(t) = r0·r_decay^t with r0 = 1, r_decay = 0.9 and t the 0-based task index,
   the values of one consistent version of the unofficial script (`scripts/cifar.sh`). Another version (quoted
   in docs/methods/lvt.md#dual-classifier-and-losses) has α = β = 1, γ = 0.5, r0 = 10; with r0 = 10, h_A is
   trained about 9:1 on the new classes and, on Fashion-MNIST with memory 200, the old classes fell to 0%
   class-IL accuracy. The paper's own values are unknown (it tuned them by grid search on 10% of the training
   data).
7. Gradients of the accumulation losses reach the backbone (`accumulation_to_backbone: true`); the paper's
   figure is not available to say whether they are stopped.
8. `dual: false` is the single-classifier ablation: one classifier trained on current data (weight 1), replay,
   distillation and L_a; no injection head.
"""
from __future__ import annotations

import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.scenario import Task
from ..errors import ConfigError
from ..models import MODELS, GrowingHead, create_backbone
from ..models.lvt import LVTNet
from .base import Batch, Method, MethodOptions, Phase, TaskContext, register_method, true_class_confidence
from .losses import classification_loss, soft_cross_entropy, stored_distillation, task_targets


# --------------------------------------------------------------------------------------------- the pieces
def estimate_importance(params: Mapping[str, torch.Tensor], batches: Iterable, loss_fn: Callable,
                        reduce: Callable | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per parameter, over batches: the mean batch-loss gradient ("mean"), the mean of its absolute value
    ("magnitude") and the mean of its square ("squared").

    batches yields the arguments of loss_fn (a scalar loss); reduce, when given, sums a tensor over processes
    (in place) so that every rank gets the averages over all ranks' batches."""
    names = list(params)
    tensors = [params[n] for n in names]
    sums = {k: [torch.zeros_like(t, dtype=torch.float32) for t in tensors] for k in ("mean", "magnitude", "squared")}
    count = torch.zeros((), dtype=torch.float32, device=tensors[0].device if tensors else "cpu")
    with torch.enable_grad():
        for args in batches:
            loss = loss_fn(*args) if isinstance(args, tuple) else loss_fn(args)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    g = g.float()
                    sums["mean"][i] += g
                    sums["magnitude"][i] += g.abs()
                    sums["squared"][i] += g * g
            count += 1
    if reduce is not None:
        for t in [t for v in sums.values() for t in v] + [count]:
            reduce(t)
    n = count.clamp(min=1)
    return {kind: {k: s / n for k, s in zip(names, v)} for kind, v in sums.items()}


def consolidation_loss(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                       importance: dict[str, torch.Tensor],
                       form: Literal["quadratic", "abs-inner"] = "quadratic") -> torch.Tensor:
    """L_a: quadratic Σ Ω·(θ − θ*)², or abs-inner Σ_tensors |⟨Ω, θ − θ*⟩| (Ω then is the mean gradient)."""
    total = None
    for name, p in params.items():
        delta = p.float() - anchor[name]
        if form == "quadratic":
            term = (importance[name] * delta * delta).sum()
        elif form == "abs-inner":
            term = (importance[name] * delta).sum().abs()
        else:
            raise ValueError(f"unknown consolidation form {form!r}")
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


# --------------------------------------------------------------------------------------------- the method
class LVTModel(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.accumulation = GrowingHead(typing.cast(int, backbone.num_features))  # h_A: all seen classes, predicts
        self.injection: nn.Module | None = None  # h_I: re-created at every task

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        return self.accumulation(self.backbone(x), task)


@dataclass
class LVTMethodOptions(MethodOptions):
    alpha: float = 2.0  # L_replay: CE of h_A on the memory batch (weights: the unofficial scripts/cifar.sh)
    beta: float = 2.0  # L_distill: KD of h_A towards the stored logits
    gamma: float = 2.0  # L_a: attention consolidation
    r0: float = 1.0  # r(t) = r0 * r_decay**t weighs L_accumulate (h_A on current data)
    r_decay: float = 0.9
    temperature: float = 2.0
    dual: bool = True  # false: single-classifier ablation
    injection_classes: Literal["task", "seen"] = "task"
    consolidation: Literal["quadratic", "abs-inner"] = "quadratic"
    importance_head: Literal["injection", "accumulation"] = "injection"
    importance: Literal["magnitude", "squared"] = "magnitude"  # quadratic form: mean |g| or mean g²
    importance_normalize: bool = True  # quadratic form: Ω divided by its maximum over all K_W and B entries
    importance_decay: float = 0.0  # Ω <- decay * Ω + Ω_t; 0: the last task only
    confidence_head: Literal["injection", "accumulation"] = "injection"
    accumulation_to_backbone: bool = True
    memory_batch: int = 0  # rows drawn from the memory per step; 0: train.batch_size

    def validate(self, key: str) -> None:
        for name in ("alpha", "beta", "gamma", "r0", "r_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: expected a value >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"{key}.temperature: expected a positive temperature, got {self.temperature}")
        if not 0.0 <= self.importance_decay <= 1.0:
            raise ConfigError(f"{key}.importance_decay: expected a value in [0, 1], got {self.importance_decay}")
        if self.memory_batch < 0:
            raise ConfigError(f"{key}.memory_batch: expected a value >= 0, got {self.memory_batch}")


@register_method("lvt")
class LVT(Method[LVTMethodOptions]):
    model: LVTModel
    __doc__ = __doc__
    uses_memory = True

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if not hasattr(MODELS.get(cfg.model.name, "model.name"), "consolidated_parameters"):
            raise ConfigError(f"model.name: LVT needs a backbone with inter-task attention ('lvt'), "
                              f"got '{cfg.model.name}'")

    def __init__(self, cfg, scenario, device):
        super().__init__(cfg, scenario, device)
        self.importance: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None

    def build_model(self) -> nn.Module:
        return LVTModel(create_backbone(self.cfg.model, self.scenario.train.image_size,
                                        self.scenario.train.channels))

    # ------------------------------------------------------------------ tasks and phases
    def begin_task(self, task):
        super().begin_task(task)
        model = self.model
        model.accumulation.add_task(task.num_classes).to(self.device)
        if self.opts.dual:
            n = task.num_classes if self.opts.injection_classes == "task" else task.end
            model.injection = nn.Linear(model.backbone.num_features, n).to(self.device)
            nn.init.trunc_normal_(model.injection.weight, std=0.02)
            nn.init.zeros_(model.injection.bias)

    def phases(self, task):
        size = self.opts.memory_batch or self.cfg.train.batch_size
        return [Phase.from_train("train", "task", self.cfg.train, task.index, memory_batch=size)]

    def r(self, t: int) -> float:
        return self.opts.r0 * self.opts.r_decay ** t

    def inference_modules(self) -> nn.Module:
        return nn.ModuleList([self.model.backbone, self.model.accumulation])  # h_I is training-only

    def logits(self, x, task=None):
        return self.model(x, task)

    def embed(self, x):
        return self.model.backbone(x)

    # ------------------------------------------------------------------ the loss
    def _injection_target(self, batch: Batch, task) -> tuple[torch.Tensor, torch.Tensor | None]:
        offset = task.offset if self.opts.injection_classes == "task" else 0
        return task_targets(batch.y, batch.soft, offset, task.end)

    def loss(self, batch, phase, task):
        o, model = self.opts, self.model
        mem = batch.memory
        n = len(batch.x)
        x = torch.cat([batch.x, mem.x]) if mem is not None else batch.x
        feats = model.backbone(x)
        acc = model.accumulation(feats if o.accumulation_to_backbone else feats.detach())
        logs = {}
        l_acc = classification_loss(acc[:n], batch)
        if o.dual:
            y, soft = self._injection_target(batch, task)
            inj = model.injection(feats[:n])
            l_inj = soft_cross_entropy(inj, soft) if soft is not None else F.cross_entropy(inj, y)
            total = l_inj + self.r(task.index) * l_acc
            logs["inject"] = l_inj.detach()
        else:
            total = l_acc
        logs["accumulate"] = l_acc.detach()
        if mem is not None:
            a_mem = acc[n:]
            l_rep = classification_loss(a_mem, mem)
            z = self.memory.lookup("logits", mem.index, self.device)
            width = self.memory.lookup("width", mem.index, self.device)
            l_dis = stored_distillation(a_mem, z, width, o.temperature)
            total = total + o.alpha * l_rep + o.beta * l_dis
            logs["replay"], logs["distill"] = l_rep.detach(), l_dis.detach()
        if self.anchor is not None and o.gamma > 0:
            l_a = consolidation_loss(model.backbone.consolidated_parameters(), self.anchor, self.importance,
                                     o.consolidation)
            total = total + o.gamma * l_a
            logs["attention"] = l_a.detach()
        return total, logs

    # ------------------------------------------------------------------ memory
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.backbone(x)
        parts = [self.model.accumulation(f)]
        if self.opts.dual:  # h_I exists from begin_task on
            parts.append(typing.cast(nn.Module, self.model.injection)(f))
        return torch.cat(parts, 1)

    def candidate_outputs(self, task: Task, ctx: TaskContext, labels: torch.Tensor, scores: bool):
        """Class-balanced memory; the selector (confidence by default) ranks the task's samples; every exemplar
        keeps h_A's logits over the classes seen so far (padded to all classes) and that width."""
        o = self.opts
        out = ctx.extract(task.train_idx, self._heads)
        acc, inj = out[:, :self.seen], out[:, self.seen:]
        feats = None
        if scores:
            if o.dual and o.confidence_head == "injection":
                local = labels - task.offset if o.injection_classes == "task" else labels
                feats = true_class_confidence(inj, local)
            else:
                feats = true_class_confidence(acc, labels)
        z = acc.new_zeros(len(acc), self.scenario.num_classes)
        z[:, :self.seen] = acc
        width = torch.full((len(acc),), self.seen, dtype=torch.long)
        return feats, {"logits": z, "width": width}

    # ------------------------------------------------------------------ consolidation
    def consolidate(self, task: Task, ctx: TaskContext) -> None:
        """Importance of K_W and B for this task, from the gradients of its loss on its training data."""
        o, model = self.opts, self.model
        params = typing.cast(LVTNet, model.backbone).consolidated_parameters()
        if not params:
            return
        use_inj = o.dual and o.importance_head == "injection"

        def task_loss(x, idx):
            y = self.scenario.train_labels[idx].to(x.device)
            f = model.backbone(x)
            if use_inj:
                return F.cross_entropy(model.injection(f), y - task.offset if o.injection_classes == "task" else y)
            return F.cross_entropy(model.accumulation(f), y)

        was_training = model.training
        model.eval()
        stats = estimate_importance(
            params, ctx.batches(task.train_idx, batch_size=self.cfg.train.batch_size), task_loss, ctx.reduce_sum)
        model.train(was_training)
        new = stats[o.importance] if o.consolidation == "quadratic" else stats["mean"]
        if o.consolidation == "quadratic" and o.importance_normalize:
            scale = torch.cat([v.flatten() for v in new.values()]).max().clamp(min=1e-30)
            new = {k: v / scale for k, v in new.items()}
        if self.importance is not None and o.importance_decay > 0:
            new = {k: o.importance_decay * self.importance[k] + v for k, v in new.items()}
        self.importance = new
        self.anchor = {k: p.detach().float().clone() for k, p in params.items()}

    # ------------------------------------------------------------------ state
    def extra_state(self):
        if self.anchor is None:
            return {}
        return {"importance": {k: v.cpu() for k, v in self.importance.items()},
                "anchor": {k: v.cpu() for k, v in self.anchor.items()}}

    def load_extra_state(self, state):
        if state.get("anchor") is None:
            self.importance = self.anchor = None
            return
        self.importance = {k: v.to(self.device) for k, v in state["importance"].items()}
        self.anchor = {k: v.to(self.device) for k, v in state["anchor"].items()}
