"""Parameter surgery: per-task parameters on a frozen network, for Piggyback, RKR and Mask-RKR
(docs/methods/taskil.md#parameter-surgery).

`apply_surgery(model, rules, params, bn)` replaces the Conv2d / Linear layers whose names match the rules by
`TaskLayer`s and every BatchNorm2d by a `TaskBatchNorm`. A TaskLayer keeps the frozen weight W and bias under their
old names and holds one `slot` of parameters per task; `set_task(model, t)` picks the slot every layer uses.
For task t the layer computes

    W_t = B(S_t) ⊙ W + R_t,   y = op(x, W_t, b) ⊙ F_t      (each term only where enabled)

- Piggyback: B(S_t) a binary mask, S_t real scores of W's shape, B = 1[S > 5e-3] with a straight-through gradient.
- RKR: R_t = LM_t·RM_t of rank K (conv: LM (k·c_in)×K, RM K×(k·c_out), the product viewed as (k, k, c_in, c_out)
  and permuted to (c_out, c_in, k, k), c_in the input channels per group: 1 for CvT's depthwise convs; linear:
  R_t = (LM_t·RM_t)ᵀ with LM h_in×K, RM K×h_out); F_t a scale per output channel (ones). A fused q,k,v Linear
  with `split=3` has separate factors per q, k and v (as for three Linears: 3·(768+768)·K rather than
  (768+2304)·K), which is what the ViT-B/16 per-task count 414,720 needs.
- Mask-RKR: task 0 learns real LM_0, RM_0, F_0; task t >= 1 learns binary masks over them:
  LM_t = B(S^LM_t) ⊙ LM_0 and so on. Variants per `TaskParams.later` / `sfg_later`; with real per-task F_t
  (`sfg_later="real"`), `sfg_spare` also keeps a shared F_0 that no task uses or trains, as the public ViT and Swin
  code does (its only effect is on the parameter count).

Parameters whose name ends in `_score` are binary masks at test time: `parameter_cost` counts them 1/32.
"""
from __future__ import annotations

import fnmatch
import typing
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

MASK_SUFFIX = "_score"
RGLater = Literal["real", "mask", "mask-lm", "mask-rm", "mask-product"]
SFGLater = Literal["real", "mask"]
BNMode = Literal["task", "shared", "frozen"]
RG_LATER, SFG_LATER, BN_MODES = get_args(RGLater), get_args(SFGLater), get_args(BNMode)


class Binarize(torch.autograd.Function):
    """1[s > threshold] forward; the gradient passes straight through (Piggyback's Binarizer)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def binarize(scores: torch.Tensor, threshold: float = 5e-3) -> torch.Tensor:
    """The binary mask of real scores; a finished task's mask is stored as bool already (see TaskLayer.freeze)."""
    if scores.dtype == torch.bool:
        return scores.float()
    return Binarize.apply(scores, threshold)


def parameter_cost(name: str, p: torch.Tensor) -> float:
    """Stored size in float32 parameters: a binary mask costs one bit per entry."""
    return p.numel() / 32 if name.endswith(MASK_SUFFIX) else float(p.numel())


def count_parameters(module: nn.Module, trainable: bool = False) -> float:
    return sum(parameter_cost(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable)


# --------------------------------------------------------------------------------------------- options
@dataclass
class LayerRule:
    """Layers to wrap: module names matching `pattern` (fnmatch; '*' crosses dots) that are Conv2d or Linear."""

    pattern: str = "*"
    split: int = 1  # RKR factors per output slice: 3 for a fused q,k,v Linear with separate q, k, v factors
    sfg: bool = True  # a per-output-channel scale after this layer (when the method uses SFG)


# The papers' choice per backbone (docs/methods/taskil.md#parameter-surgery; Swin: the public code's, no SFG after
# qkv, which the Mask-RKR table's Swin counts need: 21,888 per task at K = 2 for the CIFAR Swin, 457,216 for Swin-B).
DEFAULT_RULES: dict[str, list[LayerRule]] = {
    "vit": [LayerRule("blocks.*.attn.qkv", split=3), LayerRule("blocks.*.attn.proj"),
            LayerRule("blocks.*.mlp.fc1"), LayerRule("blocks.*.mlp.fc2")],
    "swin": [LayerRule("layers.*.blocks.*.attn.qkv", sfg=False), LayerRule("layers.*.blocks.*.attn.proj"),
             LayerRule("layers.*.blocks.*.mlp.fc1"), LayerRule("layers.*.blocks.*.mlp.fc2")],
    "resnet18": [LayerRule("*")],  # every convolution: stem, 3x3s and 1x1 downsamples
    "resnet32": [LayerRule("*")],
}


def default_rules(model_name: str) -> list[LayerRule]:
    """The papers' layers for a known backbone; every Conv2d and Linear otherwise."""
    return [LayerRule(r.pattern, r.split, r.sfg) for r in DEFAULT_RULES.get(model_name, [LayerRule("*")])]


def as_rules(spec, model_name: str) -> list[LayerRule]:
    """Config value (None, or a list of patterns / LayerRule mappings) -> rules."""
    if spec is None:
        return default_rules(model_name)
    return [LayerRule(r) if isinstance(r, str) else r for r in spec]


@dataclass
class TaskParams:
    """What every wrapped layer learns per task."""

    weight_mask: bool = False  # Piggyback: binary mask over W
    rank: int = 0  # RKR rectification W + LM·RM of this rank; 0: none
    sfg: bool = False  # RKR scaling factors per output channel
    later: RGLater = "real"  # RG of tasks >= 1: real (RKR) | mask (Mask-RKR) | mask-lm | mask-rm | mask-product (PBwR)
    sfg_later: SFGLater = "real"  # SFG of tasks >= 1: real | mask
    sfg_spare: bool = False  # with sfg_later real: one more F (ones) per layer, never used nor trained
    scale: float = 0.1  # LM, RM init: kaiming-uniform x scale
    mask_init: float = 1e-2  # mask scores start here (all ones once binarised)
    threshold: float = 5e-3

    def __post_init__(self):
        if self.later not in RG_LATER:
            raise ConfigError(f"rectification of later tasks: expected one of {RG_LATER}, got {self.later!r}")
        if self.sfg_later not in SFG_LATER:
            raise ConfigError(f"scaling factors of later tasks: expected one of {SFG_LATER}, got {self.sfg_later!r}")
        if self.sfg_spare and not (self.sfg and self.sfg_later == "real"):
            raise ConfigError("a spare set of scaling factors needs the SFG with real per-task factors")


# --------------------------------------------------------------------------------------------- layers
class TaskLayer(nn.Module):
    """A Conv2d or Linear with a frozen W, b and per-task slots (ParameterDicts) chosen by `self.task`."""

    k: int
    c_in: int
    c_out: int
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: nn.Parameter | None

    def __init__(self, layer: nn.Conv2d | nn.Linear, params: TaskParams, split: int = 1, sfg: bool = True):
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            if params.rank and kh != kw:
                raise ConfigError(f"RKR needs square kernels; got {tuple(layer.kernel_size)}")
            if split != 1:
                raise ConfigError("a layer rule's split applies to Linear layers only")
            self.stride, self.dilation, self.groups = layer.stride, layer.dilation, layer.groups
            self.padding = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
            # c_in: the input channels of each group (the weight's second dimension; 1 for a depthwise conv)
            self.k, self.c_in, self.c_out = kh, layer.weight.shape[1], layer.out_channels
        else:
            self.c_in, self.c_out = layer.in_features, layer.out_features
            if self.c_out % split:
                raise ConfigError(f"split {split} does not divide the {self.c_out} outputs of a Linear")
        self.split = split
        self.p = params
        self.use_sfg = params.sfg and sfg
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.slots = nn.ModuleList()
        self.task = 0
        spare = self.use_sfg and params.sfg_spare  # counted, never used (see the module docstring)
        self.f_spare: nn.Parameter | None
        self.register_parameter("f_spare", nn.Parameter(self.weight.new_ones(self.c_out), requires_grad=False)
                                if spare else None)

    def slot(self, t: int) -> nn.ParameterDict:
        return typing.cast(nn.ParameterDict, self.slots[t])

    # ---------------------------------------------------------------- per-task parameters
    def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        K = self.p.rank
        if self.conv:
            return (1, self.k * self.c_in, K), (1, K, self.k * self.c_out)
        return (self.split, self.c_in, K), (self.split, K, self.c_out // self.split)

    def _factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        """LM, RM: each 2-D slice kaiming-uniform (torch's default fan-in of that slice) times the scale."""
        lm_shape, rm_shape = self.factor_shapes()
        lm, rm = self.weight.new_empty(lm_shape), self.weight.new_empty(rm_shape)
        for t in (lm, rm):
            for i in range(t.shape[0]):
                nn.init.kaiming_uniform_(t[i])
            t.mul_(self.p.scale)
        return nn.Parameter(lm), nn.Parameter(rm)

    def _score(self, like: torch.Tensor | tuple) -> nn.Parameter:
        shape = like if isinstance(like, tuple) else like.shape
        return nn.Parameter(self.weight.new_full(shape, self.p.mask_init))

    def add_task(self) -> None:
        t, p = len(self.slots), self.p
        slot = nn.ParameterDict()
        if p.weight_mask:
            slot["w_score"] = self._score(self.weight)
        if p.rank:
            later = p.later if t else "real"
            lm_shape, rm_shape = self.factor_shapes()
            if later == "mask-product":
                slot["r_score"] = self._score(self.weight)
            else:
                lm, rm = self._factors() if later != "mask" else (None, None)
                if later in ("real", "mask-rm"):  # mask-rm: LM real per task (the code's LMnoPB)
                    slot["lm"] = lm
                else:
                    slot["lm_score"] = self._score(lm_shape)
                if later in ("real", "mask-lm"):
                    slot["rm"] = rm
                else:
                    slot["rm_score"] = self._score(rm_shape)
        if self.use_sfg:
            if t == 0 or p.sfg_later == "real":
                slot["f"] = nn.Parameter(self.weight.new_ones(self.c_out))
            else:
                slot["f_score"] = self._score((self.c_out,))
        self.slots.append(slot)

    def freeze(self, t: int) -> None:
        """Task t is learnt: keep its masks as bool (what they are at test time; 1 byte instead of 4 per entry)."""
        slot = self.slot(t)
        for name in [n for n in slot if n.endswith(MASK_SUFFIX)]:
            if slot[name].dtype != torch.bool:
                slot[name] = nn.Parameter(slot[name].detach() > self.p.threshold, requires_grad=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for t in range(len(self.slots)):  # a checkpoint holding frozen (bool) masks
            slot = self.slot(t)
            for name in [n for n in slot if n.endswith(MASK_SUFFIX)]:
                stored = state_dict.get(f"{prefix}slots.{t}.{name}")
                if stored is not None and stored.dtype == torch.bool and slot[name].dtype != torch.bool:
                    slot[name] = nn.Parameter(torch.zeros_like(slot[name], dtype=torch.bool), requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------- forward
    def to_weight(self, r: torch.Tensor) -> torch.Tensor:
        """(split, rows, cols) factor product -> W's layout."""
        if self.conv:
            k = self.k
            return r[0].reshape(k, k, self.c_in, self.c_out).permute(3, 2, 0, 1)
        return r.transpose(1, 2).reshape(self.c_out, self.c_in)

    def rectification(self, t: int) -> torch.Tensor:
        slot, base, thr = self.slot(t), self.slot(0), self.p.threshold
        if "r_score" in slot:
            return binarize(slot["r_score"], thr) * self.to_weight(torch.bmm(base["lm"], base["rm"]))
        lm = slot["lm"] if "lm" in slot else binarize(slot["lm_score"], thr) * base["lm"]
        rm = slot["rm"] if "rm" in slot else binarize(slot["rm_score"], thr) * base["rm"]
        return self.to_weight(torch.bmm(lm, rm))

    def scale_factor(self, t: int) -> torch.Tensor:
        slot = self.slot(t)
        if "f" in slot:
            return slot["f"]
        return binarize(slot["f_score"], self.p.threshold) * self.slot(0)["f"]

    def task_weight(self, t: int) -> torch.Tensor:
        slot = self.slot(t)
        w: torch.Tensor = self.weight
        if "w_score" in slot:
            w = binarize(slot["w_score"], self.p.threshold) * w
        if self.p.rank:
            w = w + self.rectification(t)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.task
        if not 0 <= t < len(self.slots):
            raise RuntimeError(f"task {t} has no parameters in this layer ({len(self.slots)} tasks added)")
        w = self.task_weight(t)
        if self.conv:
            y = F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = F.linear(x, w, self.bias)
        if self.use_sfg:
            f = self.scale_factor(t)
            y = y * (f.view(1, -1, 1, 1) if self.conv else f)
        return y

    def extra_repr(self) -> str:
        kind = f"conv {self.k}x{self.k}" if self.conv else "linear"
        return (f"{kind} {self.c_in}->{self.c_out}, tasks={len(self.slots)}, mask={self.p.weight_mask}, "
                f"rank={self.p.rank}, split={self.split}, sfg={self.use_sfg}"
                + (", spare F" if self.f_spare is not None else ""))


class TaskBatchNorm(nn.Module):
    """BatchNorm2d whose running statistics are per task ("task"), shared and updated by every task ("shared", the
    public RKR code), or never updated ("frozen", Piggyback). Scale and shift, if any, are kept (frozen) and shared."""

    def __init__(self, bn: nn.BatchNorm2d, mode: BNMode = "task"):
        super().__init__()
        if mode not in BN_MODES:
            raise ConfigError(f"bn: expected one of {BN_MODES}, got {mode!r}")
        self.mode, self.eps, self.momentum = mode, bn.eps, bn.momentum if bn.momentum is not None else 0.1
        self.num_features = bn.num_features
        self.weight = None if bn.weight is None else nn.Parameter(bn.weight.detach().clone(), requires_grad=False)
        self.bias = None if bn.bias is None else nn.Parameter(bn.bias.detach().clone(), requires_grad=False)
        if bn.running_mean is None or bn.running_var is None:
            raise ConfigError("bn: parameter surgery needs BatchNorm layers that track running statistics")
        self.running_mean: torch.Tensor
        self.running_var: torch.Tensor
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.stats = nn.ModuleList()
        self.task = 0

    def add_task(self) -> None:
        if self.mode == "task":
            s = nn.Module()
            s.register_buffer("running_mean", self.running_mean.clone())
            s.register_buffer("running_var", self.running_var.clone())
            self.stats.append(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "task":
            s = self.stats[self.task]
            mean, var = typing.cast(torch.Tensor, s.running_mean), typing.cast(torch.Tensor, s.running_var)
        else:
            mean, var = self.running_mean, self.running_var
        training = self.training and self.mode != "frozen"
        return F.batch_norm(x, mean, var, self.weight, self.bias, training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, mode={self.mode}, tasks={len(self.stats)}"


# --------------------------------------------------------------------------------------------- model-level
def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def apply_surgery(model: nn.Module, rules: list[LayerRule], params: TaskParams, bn: BNMode = "task",
                  key: str = "method.layers") -> list[str]:
    """Wrap the matching layers and every BatchNorm2d of `model` in place; returns the wrapped layer names."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n]
    wrapped, used = [], set()
    for name, layer in layers:
        rule = next((r for r in rules if fnmatch.fnmatchcase(name, r.pattern)), None)
        if rule is None:
            continue
        used.add(rule.pattern)
        try:
            _replace(model, name, TaskLayer(layer, params, rule.split, rule.sfg))
        except ConfigError as exc:
            raise ConfigError(f"{key}: layer '{name}': {exc}") from None
        wrapped.append(name)
    unused = [r.pattern for r in rules if r.pattern not in used]
    if unused:
        examples = ", ".join(n for n, _ in layers[:4])
        raise ConfigError(f"{key}: '{unused[0]}' matches no Conv2d or Linear layer (their names look like: "
                          f"{examples})")
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]:
        _replace(model, name, TaskBatchNorm(m, bn))
    return wrapped


def task_modules(model: nn.Module) -> list[TaskLayer | TaskBatchNorm]:
    return [m for m in model.modules() if isinstance(m, (TaskLayer, TaskBatchNorm))]


def add_task(model: nn.Module) -> None:
    for m in task_modules(model):
        m.add_task()


def set_task(model: nn.Module, task: int) -> None:
    for m in task_modules(model):
        m.task = task


def freeze_task(model: nn.Module, task: int) -> None:
    for m in model.modules():
        if isinstance(m, TaskLayer) and task < len(m.slots):
            m.freeze(task)


def slot_parameters(model: nn.Module, task: int) -> list[nn.Parameter]:
    """The parameters task `task` learns in the wrapped layers."""
    return [p for m in model.modules() if isinstance(m, TaskLayer) and task < len(m.slots)
            for p in m.slot(task).values()]
