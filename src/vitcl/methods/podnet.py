"""PODNet (Douillard et al., ECCV 2020): pooled-output distillation and a local-similarity classifier on a ResNet.

Per task t (facts, sources and the reference code's differences: docs/methods/podnet.md):
- grow: K proxies per new class in the LSC; for t >= 1 they come from the new classes' features under the network
  trained on task t - 1 (k-means of the L2-normalised features, the centres scaled to the mean proxy norm: the
  reference's imprinting; `proxy_init: random` draws them), and a teacher, the frozen copy of the model.
- phase "train" on the task's data + the memory, old proxies frozen (`freeze_old_proxies`):
      NCA(LSC(h), y)  +  lambda_flat sqrt(n_seen / n_new) POD-flat(h_old, h)
                      +  lambda_spatial sqrt(n_seen / n_new) POD-spatial(stages_old, stages),
  h the pooled output of the last stage, the stages the outputs of every ResNet stage.
- memory update: herding on h (20 per class in the presets).
- phase "finetune" (t >= 1) on the balanced memory (old and new exemplars alike): the classifier's proxies only,
  NCA alone (the distillation terms give the proxies no gradient), constant lr.
Scores are the LSC's class similarities (CNN); `embed` gives h for herding and for class means.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, TrainingError
from ..models import MODELS, create_backbone
from ..models.resnet import ResNet
from .base import Method, MethodOptions, Phase, register_method
from .losses import local_similarity, nca_margin_loss, pod_flat, pod_spatial
from .nme import NMEScorer


class LocalSimilarityClassifier(nn.Module):
    """K proxies per class, one parameter block per task (class-major rows), and the learned NCA scale eta."""

    def __init__(self, dim: int, proxies_per_class: int, similarity: str, scale_init: float, learn_scale: bool):
        super().__init__()
        self.dim, self.k, self.similarity = dim, proxies_per_class, similarity
        self.proxies = nn.ParameterList()
        self.scale = nn.Parameter(torch.tensor(float(scale_init)), requires_grad=learn_scale)
        self.learn_scale = learn_scale

    @property
    def num_classes(self) -> int:
        return sum(p.shape[0] for p in self.proxies) // self.k

    def add(self, weights: torch.Tensor) -> nn.Parameter:
        p = nn.Parameter(weights)
        self.proxies.append(p)
        return p

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return local_similarity(h, torch.cat(list(self.proxies)), self.k, self.similarity)  # type: ignore[arg-type]


class PODNetNet(nn.Module):
    def __init__(self, backbone: ResNet, classifier: LocalSimilarityClassifier, last_relu: bool,
                 split_last_block: bool):
        super().__init__()
        self.backbone, self.classifier = backbone, classifier
        self.last_relu, self.split_last_block = last_relu, split_last_block

    def stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(every stage's output, the pooled embedding h of the last one)."""
        maps = self.backbone.forward_stages(x, self.last_relu, self.split_last_block)
        return maps, self.backbone.forward_head(maps[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.stages(x)[1])


@dataclass
class PODNetOptions(MethodOptions):
    proxies_per_class: int = 10  # K
    similarity: Literal["cosine", "neg_squared_distance"] = "cosine"  # reference: neg_squared_distance
    nca: Literal["paper", "reference"] = "paper"
    nca_margin: float = 0.6  # delta
    scale_init: float = 1.0  # eta at the start (the reference's learned_scaling initial_value)
    learn_scale: bool = True
    pod_spatial_weight: float = 3.0  # lambda_spatial (CIFAR; the reference's ImageNet-100 value is 8)
    pod_flat_weight: float = 1.0  # lambda_flat (CIFAR; ImageNet-100: 10)
    pod_flat_distance: Literal["cosine", "euclidean"] = "cosine"
    last_relu: bool = False  # false: the last block's output before its ReLU, as the reference networks
    split_last_block: bool = False  # the last block as a stage of its own (the reference's CIFAR ResNet-32)
    proxy_init: Literal["kmeans", "random"] = "kmeans"  # new classes' proxies for t >= 1
    freeze_old_proxies: bool = True  # the reference's groupwise lr factor 0 on the old classes' proxies
    grad_clamp: float | None = 5.0  # each gradient entry clamped to [-c, c], as the reference's hooks; null: off
    finetune_epochs: int = 20  # 0: no class-balanced finetuning
    finetune_lr: float = 0.05  # CIFAR; ImageNet-100: 0.01
    finetune_params: Literal["classifier", "all"] = "classifier"

    def validate(self, key: str) -> None:
        if self.proxies_per_class < 1:
            raise ConfigError(f"{key}.proxies_per_class: expected an integer >= 1, got {self.proxies_per_class}")
        for name in ("nca_margin", "pod_spatial_weight", "pod_flat_weight", "finetune_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: expected a value >= 0, got {getattr(self, name)}")
        if self.scale_init <= 0:
            raise ConfigError(f"{key}.scale_init: expected a positive scale, got {self.scale_init}")
        if self.grad_clamp is not None and self.grad_clamp <= 0:
            raise ConfigError(f"{key}.grad_clamp: expected a positive bound or null, got {self.grad_clamp}")
        if self.finetune_epochs < 0:
            raise ConfigError(f"{key}.finetune_epochs: expected an integer >= 0, got {self.finetune_epochs}")


@register_method("podnet")
class PODNet(Method[PODNetOptions]):
    model: PODNetNet
    uses_memory = True
    hard_labels = True
    settings = frozenset({"class-il"})

    def __init__(self, cfg, scenario, device):
        self.teacher: PODNetNet | None = None
        self.pending: torch.Tensor | None = None  # the next task's proxies, imprinted after this task
        self.nme = NMEScorer()  # the paper's NME row, beside the LSC's (CNN) scores
        super().__init__(cfg, scenario, device)

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        model = MODELS.get(cfg.model.name, "model.name")
        if not (isinstance(model, type) and issubclass(model, ResNet)):
            raise ConfigError(f"model.name: podnet distils the stages of a ResNet ('resnet18' or 'resnet32'), "
                              f"got '{cfg.model.name}'")
        if cfg.data.augment.label_smoothing > 0:
            raise ConfigError("data.augment.label_smoothing: podnet's NCA loss takes hard labels; set it to 0")

    def build_model(self) -> nn.Module:
        o = self.opts
        backbone = create_backbone(self.cfg.model, self.scenario.train.image_size, self.scenario.train.channels)
        if not isinstance(backbone, ResNet):
            raise ConfigError(f"model.name: podnet needs a ResNet, got '{self.cfg.model.name}'")
        clf = LocalSimilarityClassifier(backbone.num_features, o.proxies_per_class, o.similarity, o.scale_init,
                                        o.learn_scale)
        net = PODNetNet(backbone, clf, o.last_relu, o.split_last_block)
        for p in net.parameters():
            self._clamp_grad(p)
        return net

    def _clamp_grad(self, p: nn.Parameter) -> None:
        c = self.opts.grad_clamp
        if c is not None and p.requires_grad:
            p.register_hook(lambda g: g.clamp(-c, c))

    # ------------------------------------------------------------------ growth
    def begin_task(self, task):
        super().begin_task(task)
        if task.index > 0:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        clf = self.model.classifier
        rows = task.num_classes * clf.k
        weights = self.pending
        if weights is None or weights.shape != (rows, clf.dim):
            # kaiming normal, linear gain: std 1/sqrt(D) (the reference's first task, and `proxy_init: random`)
            weights = torch.randn(rows, clf.dim, device=self.device) / math.sqrt(clf.dim)
        self.pending = None
        self._clamp_grad(clf.add(weights.to(self.device)))

    def extra_scorers(self) -> tuple[str, ...]:
        return ("nme",)

    def scores(self, x):
        h = self.model.stages(x)[1]
        return self.model.classifier(h), {"nme": self.nme(h, self.seen)}

    def consolidate(self, task, ctx):
        """The class means of the memory for NME scoring; then imprint the next task's proxies with the network as
        it enters that task (nothing changes it between here and begin_task): k-means of each new class's
        normalised features, centres times the mean norm of the proxies so far."""
        rows = self.memory.indices()
        self.nme.update(ctx, rows, self.scenario.train_labels[rows], self.embed, self.seen, True)
        nxt = task.index + 1
        if nxt >= len(self.scenario) or self.opts.proxy_init != "kmeans":
            return
        from sklearn.cluster import KMeans

        nt, k = self.scenario[nxt], self.opts.proxies_per_class
        labels = self.scenario.train_labels[nt.train_idx]
        feats = F.normalize(ctx.extract(nt.train_idx, self.embed), dim=1).cpu()
        norm = torch.cat(list(self.model.classifier.proxies)).detach().norm(dim=1).mean().cpu()
        out = []
        for c in nt.labels:
            f = feats[labels.cpu() == c]
            if len(f) < k:
                raise TrainingError(f"method.proxies_per_class: class {c} has {len(f)} training images, fewer "
                                    f"than the {k} proxies k-means needs (use method.proxy_init=random)")
            if k == 1:
                centres = F.normalize(f.mean(0, keepdim=True), dim=1)
            else:
                km = KMeans(n_clusters=k, n_init=10, random_state=self.cfg.run.seed + nxt).fit(f.double().numpy())
                centres = torch.from_numpy(km.cluster_centers_).float()
            out.append(centres * norm)
        self.pending = torch.cat(out)

    def phases(self, task):
        o, t = self.opts, self.cfg.train
        phases = [Phase.from_train("train", "task+memory", t, task.index)]
        if task.index > 0 and o.finetune_epochs > 0 and self.memory.enabled:
            phases.append(Phase.from_train("finetune", "memory", t, task.index, epochs=o.finetune_epochs,
                                           lr=t.scaled_lr(o.finetune_lr), schedule="constant", warmup_epochs=0))
        return phases

    def setup_phase(self, phase, task):
        m, o = self.model, self.opts
        m.requires_grad_(True)
        m.train()
        m.classifier.scale.requires_grad_(o.learn_scale)
        if phase.name == "finetune":
            if o.finetune_params == "classifier":
                m.backbone.requires_grad_(False)
                m.classifier.scale.requires_grad_(False)
        elif o.freeze_old_proxies:
            for p in list(m.classifier.proxies)[:-1]:
                p.requires_grad_(False)

    # ------------------------------------------------------------------ losses
    def loss(self, batch, phase, task):
        o, m = self.opts, self.model
        maps, h = m.stages(batch.x)
        sims = m.classifier(h)
        nca = nca_margin_loss(sims, batch.y, m.classifier.scale, o.nca_margin, o.nca)
        loss, logs = nca, {"nca": nca.detach()}
        if self.teacher is None or phase.name != "train":
            return loss, logs
        with torch.no_grad():
            old_maps, old_h = self.teacher.stages(batch.x)
        factor = math.sqrt(self.seen / task.num_classes)
        flat = pod_flat(old_h, h, o.pod_flat_distance)
        spatial = pod_spatial(old_maps, maps)
        loss = loss + o.pod_flat_weight * factor * flat + o.pod_spatial_weight * factor * spatial
        logs.update(flat=flat.detach(), spatial=spatial.detach())
        return loss, logs

    def logits(self, x, task=None):
        return self.model(x)

    def embed(self, x):
        """h, the pooled output of the last stage (herding; class means for NME scoring)."""
        return self.model.stages(x)[1]

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "pending": self.pending, "nme": self.nme.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if state.get("teacher") is not None and self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.pending = state.get("pending")
        self.nme.load_state_dict(state.get("nme", {}), self.device)
