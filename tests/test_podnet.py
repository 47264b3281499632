"""PODNet: POD-spatial, POD-flat, the local-similarity classifier and the NCA loss against loop-by-loop
transcriptions; the ResNet's stage outputs; proxy imprinting; the loss's adaptive weights; what each phase
trains; the presets' parameter counts; a tiny run through the CLI."""
import json
import math

import pytest
import torch

from vitcl.cli import main, param_rows
from vitcl.data.build import build_scenario
from vitcl.errors import ConfigError
from vitcl.methods import METHODS, Batch
from vitcl.methods.losses import local_similarity, nca_margin_loss, pod_flat, pod_spatial
from vitcl.models.resnet import ResNet18, ResNet18Options, ResNet32, ResNet32Options
from vitcl.runconfig import load_config


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run several times faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = ["model.width=4", "method.proxies_per_class=2", "data.train_per_class=20", "data.test_per_class=10",
        "data.increment=[4,3,3]", "data.class_order=null", "data.augment.crop_padding=0"]


# --------------------------------------------------------------------------------------------- slow transcriptions
def slow_pod_spatial(old, new):
    total = 0.0
    for a, b in zip(old, new):
        B, C, H, W = a.shape
        per_image = []
        for i in range(B):
            vecs = []
            for m in (a[i], b[i]):
                v = []
                for c in range(C):  # pooled over the width: one value per (channel, row)
                    for r in range(H):
                        v.append(sum(float(m[c, r, w]) ** 2 for w in range(W)))
                for c in range(C):  # pooled over the height: one value per (channel, column)
                    for w in range(W):
                        v.append(sum(float(m[c, r, w]) ** 2 for r in range(H)))
                n = math.sqrt(sum(x * x for x in v))
                vecs.append([x / n for x in v])
            per_image.append(math.sqrt(sum((p - q) ** 2 for p, q in zip(*vecs))))
        total += sum(per_image) / B
    return total / len(old)


def slow_lsc(h, proxies, k, similarity):
    B, D = h.shape
    C = proxies.shape[0] // k
    out = torch.zeros(B, C, dtype=torch.float64)
    for i in range(B):
        hn = h[i] / math.sqrt(sum(float(x) ** 2 for x in h[i]))
        for c in range(C):
            s = []
            for j in range(k):
                w = proxies[c * k + j]
                wn = w / math.sqrt(sum(float(x) ** 2 for x in w))
                cos = sum(float(p) * float(q) for p, q in zip(hn, wn))
                s.append(cos if similarity == "cosine" else -sum((float(p) - float(q)) ** 2 for p, q in zip(hn, wn)))
            e = [math.exp(x) for x in s]
            out[i, c] = sum(x * ei / sum(e) for x, ei in zip(s, e))
    return out


def slow_nca_paper(s, y, eta, delta):
    losses = []
    for i in range(s.shape[0]):
        t = int(y[i])
        num = math.exp(eta * (float(s[i, t]) - delta))
        den = sum(math.exp(eta * float(s[i, j])) for j in range(s.shape[1]) if j != t)
        losses.append(max(-math.log(num / den), 0.0))
    return sum(losses) / len(losses)


def slow_nca_reference(s, y, eta, delta):
    """The reference's nca(): eta (s - delta) everywhere, minus the row max; the true entry of the denominator
    replaced by 0 (so exp(0) = 1 stays in the sum)."""
    losses = []
    for i in range(s.shape[0]):
        t = int(y[i])
        z = [eta * (float(s[i, j]) - delta) for j in range(s.shape[1])]
        zmax = max(z)
        z = [v - zmax for v in z]
        den = [0.0 if j == t else z[j] for j in range(len(z))]
        losses.append(-(z[t] - math.log(sum(math.exp(v) for v in den))))
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------------------------- the formulas
def test_pod_spatial_matches_the_slow_transcription():
    g = torch.Generator().manual_seed(0)
    old = [torch.randn(3, 2, 4, 5, generator=g), torch.randn(3, 3, 2, 3, generator=g)]
    new = [o + 0.3 * torch.randn(o.shape, generator=g) for o in old]
    assert float(pod_spatial(old, new)) == pytest.approx(slow_pod_spatial(old, new), rel=1e-5)
    assert float(pod_spatial(old, old)) == pytest.approx(0.0, abs=1e-6)


def test_pod_spatial_pools_width_and_height_apart():
    """Two maps with the same per-channel totals but the mass moved along a row: a channel-only pooling would
    see no change, POD-spatial does."""
    a = torch.zeros(1, 1, 2, 2)
    a[0, 0, 0, 0] = a[0, 0, 1, 1] = 1.0
    b = torch.zeros(1, 1, 2, 2)
    b[0, 0, 0, 1] = b[0, 0, 1, 1] = 1.0
    assert float(pod_spatial([a], [b])) == pytest.approx(slow_pod_spatial([a], [b])) and float(pod_spatial([a], [b])) > 0.3


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_pod_flat_matches_the_slow_transcription(distance):
    g = torch.Generator().manual_seed(1)
    old, new = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    want = []
    for i in range(4):
        dot = sum(float(p) * float(q) for p, q in zip(old[i], new[i]))
        na = math.sqrt(sum(float(p) ** 2 for p in old[i]))
        nb = math.sqrt(sum(float(q) ** 2 for q in new[i]))
        d = math.sqrt(sum((float(p) - float(q)) ** 2 for p, q in zip(old[i], new[i])))
        want.append(1 - dot / (na * nb) if distance == "cosine" else d)
    assert float(pod_flat(old, new, distance)) == pytest.approx(sum(want) / 4, rel=1e-5)


@pytest.mark.parametrize("similarity", ["cosine", "neg_squared_distance"])
def test_local_similarity_matches_the_slow_transcription(similarity):
    g = torch.Generator().manual_seed(2)
    h, proxies = torch.randn(3, 5, generator=g), torch.randn(4 * 3, 5, generator=g)
    got = local_similarity(h, proxies, 3, similarity)
    assert got.shape == (3, 4)
    assert torch.allclose(got.double(), slow_lsc(h, proxies, 3, similarity), atol=1e-5)


def test_neg_squared_distance_is_twice_the_cosine_minus_two_with_one_proxy():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g)
    assert torch.allclose(local_similarity(h, w, 1, "neg_squared_distance"),
                          2 * local_similarity(h, w, 1, "cosine") - 2, atol=1e-5)


def test_nca_paper_form_matches_the_slow_transcription():
    g = torch.Generator().manual_seed(4)
    s, y = torch.rand(6, 5, generator=g) * 2 - 1, torch.tensor([0, 1, 2, 3, 4, 0])
    for eta, delta in [(1.0, 0.6), (3.0, 0.0), (7.5, 0.6)]:
        got = nca_margin_loss(s, y, eta, delta, "paper")
        assert float(got) == pytest.approx(slow_nca_paper(s, y, eta, delta), rel=1e-5, abs=1e-6)


def test_nca_paper_form_hinges_at_zero():
    s = torch.tensor([[1.0, -1.0, -1.0]])
    assert float(nca_margin_loss(s, torch.tensor([0]), 16.0, 0.0, "paper")) == 0.0  # confident: -log ratio < 0


def test_nca_reference_form_matches_the_slow_transcription_and_ignores_the_margin():
    g = torch.Generator().manual_seed(5)
    s, y = torch.rand(6, 4, generator=g) * 4 - 4, torch.tensor([0, 1, 2, 3, 1, 2])
    eta = torch.tensor(2.5)
    got = nca_margin_loss(s, y, eta, 0.6, "reference")
    assert float(got) == pytest.approx(slow_nca_reference(s, y, 2.5, 0.6), rel=1e-5)
    # every class is shifted by eta * delta, so the reference's margin has no effect
    assert float(nca_margin_loss(s, y, eta, 0.0, "reference")) == pytest.approx(float(got), rel=1e-5)
    assert float(nca_margin_loss(s, y, 2.5, 0.6, "paper")) != pytest.approx(float(got), rel=1e-3)


def test_nca_gradient_reaches_the_learned_scale():
    s = torch.rand(4, 3)
    eta = torch.tensor(1.0, requires_grad=True)
    nca_margin_loss(s, torch.tensor([0, 1, 2, 0]), eta, 0.6, "reference").backward()
    assert eta.grad is not None and float(eta.grad) != 0.0


# --------------------------------------------------------------------------------------------- the ResNet's stages
def test_forward_stages_keep_the_existing_outputs():
    torch.manual_seed(0)
    net = ResNet18.from_options(ResNet18Options(width=4), 16, 3).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        stages = net.forward_stages(x)
        pre = net.forward_stages(x, last_relu=False)
        feats = net.forward_features(x)
    assert [s.shape[1] for s in stages] == [4, 8, 16, 32] and [s.shape[-1] for s in stages] == [16, 8, 4, 2]
    assert torch.equal(stages[-1], feats)
    assert all(torch.equal(a, b) for a, b in zip(stages[:-1], pre[:-1]))
    assert torch.allclose(pre[-1].clamp(min=0), feats) and bool((pre[-1] < 0).any())


def test_resnet32_split_last_block_is_the_references_fourth_stage():
    torch.manual_seed(0)
    net = ResNet32.from_options(ResNet32Options(width=4), 8, 3).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        split = net.forward_stages(x, last_relu=False, split_last_block=True)
        plain = net.forward_stages(x, last_relu=False)
        rest = net.layer3[:-1](net.forward_stages(x)[1])
    assert len(split) == 4 and len(plain) == 3
    assert torch.allclose(split[2], rest) and torch.equal(split[3], plain[2])


# --------------------------------------------------------------------------------------------- the method
def make(*extra):
    cfg, _ = load_config(["podnet/digits-b0inc2"], [*TINY, *extra])
    scenario = build_scenario(cfg.data)
    torch.manual_seed(0)
    return METHODS.get("podnet")(cfg, scenario, torch.device("cpu"))


class Ctx:
    """The engine's extract() without its loader: test-transformed (plain) images, no gradients."""

    def __init__(self, m):
        self.m = m

    def extract(self, indices, fn, augment=False, batch_size=None):
        self.m.model.eval()
        with torch.no_grad():
            out = fn(self.m.scenario.train.images[indices].float() / 255)
        self.m.model.train()
        return out


def batch_of(m, t, n=16):
    idx = m.scenario[t].train_idx[:n]
    y = m.scenario.train_labels[idx]
    return Batch(x=m.scenario.train.images[idx].float() / 255, y=y, task=torch.full_like(y, t), index=idx)


def step(m, t, phase_index=0):
    task = m.scenario[t]
    phase = m.phases(task)[phase_index]
    m.setup_phase(phase, task)
    loss, logs = m.loss(batch_of(m, t), phase, task)
    m.model.zero_grad()
    loss.backward()
    return phase, loss, logs


def test_imprinted_proxies_are_kmeans_centres_at_the_mean_proxy_norm():
    m = make("method.proxies_per_class=1")
    m.begin_task(m.scenario[0])
    m.consolidate(m.scenario[0], Ctx(m))
    nxt = m.scenario[1]
    norm = m.model.classifier.proxies[0].detach().norm(dim=1).mean()
    feats = Ctx(m).extract(nxt.train_idx, m.embed)
    labels = m.scenario.train_labels[nxt.train_idx]
    for row, c in enumerate(nxt.labels):  # K = 1: the normalised mean of the normalised features, times the norm
        f = feats[labels == c]
        mean = sum(v / v.norm() for v in f) / len(f)
        assert torch.allclose(m.pending[row], mean / mean.norm() * norm, atol=1e-5)
    pending = m.pending
    m.begin_task(nxt)
    assert torch.equal(m.model.classifier.proxies[1].detach(), pending) and m.pending is None
    assert m.model.classifier.num_classes == 7


def test_kmeans_proxies_per_class_and_their_norm():
    m = make("method.proxies_per_class=3")
    m.begin_task(m.scenario[0])
    m.consolidate(m.scenario[0], Ctx(m))
    pending = m.pending
    norm = m.model.classifier.proxies[0].detach().norm(dim=1).mean()
    m.begin_task(m.scenario[1])
    new = m.model.classifier.proxies[1].detach()
    assert new.shape == (3 * 3, 4 * 8) and torch.equal(new, pending)
    # k-means centres of unit vectors, scaled: inside the ball of radius `norm`, not random draws
    assert bool((new.norm(dim=1) <= norm * (1 + 1e-5)).all()) and bool((new.norm(dim=1) > 0.3 * norm).all())


def test_loss_weights_pod_by_sqrt_seen_over_new():
    m = make()
    m.begin_task(m.scenario[0])
    step(m, 0)
    m.consolidate(m.scenario[0], Ctx(m))
    m.begin_task(m.scenario[1])
    task = m.scenario[1]
    phase = m.phases(task)[0]
    m.setup_phase(phase, task)
    b = batch_of(m, 1)
    loss, logs = m.loss(b, phase, task)
    o = m.opts
    maps, h = m.model.stages(b.x)
    with torch.no_grad():
        old_maps, old_h = m.teacher.stages(b.x)
    nca = nca_margin_loss(m.model.classifier(h), b.y, m.model.classifier.scale, o.nca_margin, o.nca)
    factor = math.sqrt(7 / 3)
    want = nca + factor * (o.pod_flat_weight * pod_flat(old_h, h) + o.pod_spatial_weight * pod_spatial(old_maps, maps))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert logs["spatial"].item() == pytest.approx(pod_spatial(old_maps, maps).item(), rel=1e-5)
    assert len(maps) == 4 and float(logs["flat"]) > 0


def test_what_each_phase_trains():
    m = make()
    m.begin_task(m.scenario[0])
    assert [p.name for p in m.phases(m.scenario[0])] == ["train"]
    step(m, 0)
    m.consolidate(m.scenario[0], Ctx(m))
    m.begin_task(m.scenario[1])
    phases = m.phases(m.scenario[1])
    assert [p.name for p in phases] == ["train", "finetune"] and phases[1].data == "memory"
    assert phases[1].lr == pytest.approx(0.05) and phases[1].schedule == "constant" and phases[1].epochs == 5
    clf = m.model.classifier
    step(m, 1, 0)  # train: backbone, newest proxies and the scale; old proxies frozen
    assert clf.proxies[0].grad is None and clf.proxies[1].grad is not None and clf.scale.grad is not None
    assert all(p.grad is not None for p in m.model.backbone.parameters())
    step(m, 1, 1)  # finetune: every proxy, nothing else
    assert clf.proxies[0].requires_grad and clf.proxies[0].grad is not None and clf.proxies[1].grad is not None
    assert not clf.scale.requires_grad and not any(p.requires_grad for p in m.model.backbone.parameters())


def test_gradients_are_clamped_entrywise():
    m = make("method.grad_clamp=1.0e-4")
    m.begin_task(m.scenario[0])
    step(m, 0)
    grads = [p.grad for p in m.model.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) <= 1e-4 + 1e-12
    assert any(float(g.abs().max()) == pytest.approx(1e-4) for g in grads)


def test_checks_refuse_a_transformer_and_mixup():
    with pytest.raises(ConfigError, match="ResNet"):
        load_config(["podnet/digits-b0inc2"], ["model.name=vit"])
    with pytest.raises(ConfigError, match="mixup"):
        load_config(["podnet/digits-b0inc2"], ["data.augment.mixup_alpha=0.8"])
    with pytest.raises(ConfigError, match="proxies_per_class"):
        load_config(["podnet/digits-b0inc2"], ["method.proxies_per_class=0"])


# --------------------------------------------------------------------------------------------- presets
PRESETS = ["podnet/cifar100-b0inc10", "podnet/cifar100-b0inc5", "podnet/cifar100-b0inc2",
           "podnet/imagenet100-b0inc10", "podnet/cifar100-b50inc10"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build(preset):
    cfg, _ = load_config([preset])
    scenario = build_scenario(cfg.data, shapes_only=True)
    assert cfg.method.name == "podnet" and cfg.memory.per_class == 20 and cfg.data.augment.randaugment is None
    assert cfg.method.nca == "reference" and cfg.method.similarity == "neg_squared_distance"
    assert len(scenario) == {"b0inc10": 10, "b0inc5": 20, "b0inc2": 50, "b50inc10": 6}[preset.split("-")[-1]]


def test_imagenet_preset_takes_the_references_imagenet_values():
    cfg, _ = load_config(["podnet/imagenet100-b0inc10"])
    o = cfg.method
    assert (o.pod_spatial_weight, o.pod_flat_weight, o.finetune_lr) == (8.0, 10.0, 0.01)
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.model.stem) == (0.05, 90, 64, "imagenet")


@pytest.mark.parametrize("preset,overrides,want", [
    ("podnet/cifar100-b0inc10", [], 11.68),  # ResNet-18 + 10 proxies x 512 x 100 classes + the scale
    ("podnet/cifar100-b0inc10", ["method.proxies_per_class=1"], 11.22),  # the DyTox table's #P
    ("podnet/imagenet100-b0inc10", ["method.proxies_per_class=1"], 11.23),
])
def test_parameter_counts(preset, overrides, want):
    cfg, _ = load_config([preset], overrides)
    rows, _ = param_rows(cfg)
    assert round(rows[-1]["total"] / 1e6, 2) == want


# --------------------------------------------------------------------------------------------- a run
def test_tiny_run_through_the_cli(tmp_path):
    rc = main(["run", "podnet/digits-b0inc2", *TINY, "train.epochs=3",
               "method.finetune_epochs=1", "train.batch_size=20", f"run.out_dir={tmp_path}", "run.name=r", "run.threads=1", "-q"])
    assert rc == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    acc = res["class_il"]["acc_matrix"]
    assert len(acc) == 3
    assert acc[0][0] > 50  # 4 classes: chance is 25
    assert res["class_il"]["avg_incremental"] > 30  # 10 classes at the end: chance is 10
    nme = res["extra"]["nme"]["class_il"]  # the NME row, from the same evaluation pass
    assert len(nme["acc_matrix"]) == 3 and nme["avg_incremental"] > 30


@pytest.mark.parametrize("model", [[], ["model.name=resnet32", "model.width=4", "method.split_last_block=true"]])
def test_state_restores_teacher_and_proxies(model):
    """A method rebuilt from a state dict (the engine's resume: begin_task up to the task, then load) scores alike;
    ResNet-32 with its last block as a stage gives the reference's four POD maps."""
    m = make(*model)
    m.begin_task(m.scenario[0])
    step(m, 0)
    m.consolidate(m.scenario[0], Ctx(m))
    m.begin_task(m.scenario[1])
    _, _, logs = step(m, 1)
    assert float(logs["spatial"]) >= 0 and len(m.model.stages(batch_of(m, 1).x)[0]) == 4
    state = m.state_dict()
    fresh = make(*model)
    for t in range(2):
        fresh.begin_task(fresh.scenario[t])
    fresh.load_state_dict(state)
    x = batch_of(m, 1).x
    m.model.eval()
    fresh.model.eval()
    with torch.no_grad():
        assert torch.allclose(fresh.logits(x), m.logits(x))
        assert torch.allclose(fresh.teacher(x), m.teacher(x))
