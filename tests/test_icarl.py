"""iCaRL: its BCE distillation, the class means of exemplars (with the flip) and the NME scores against slow
transcriptions; the evaluator's extra scorers; a tiny run through the engine and the CLI; the presets and #P."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import run_cli
from vitcl.cli import main, param_rows
from vitcl.data.build import build_scenario
from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.methods import METHODS
from vitcl.methods.losses import icarl_bce
from vitcl.methods.nme import NMEScorer, class_means
from vitcl.runconfig import load_config

TINY_RESNET = ["model.width=8", "data.train_per_class=40", "data.test_per_class=10", "train.epochs=4",
               "train.lr=0.1", "train.batch_size=16", "eval.batch_size=64", "memory.size=40",
               "data.increment=[4,3,3]", "run.threads=1"]
QUICK = ["train.epochs=1", "data.train_per_class=10", "data.increment=[5,5]"]


# ------------------------------------------------------------------ losses and the NME, against the formulas
def test_icarl_bce_is_the_papers_sum_over_outputs():
    torch.manual_seed(0)
    B, C, n_old = 5, 7, 4
    logits, teacher = torch.randn(B, C), torch.randn(B, n_old)
    y = torch.tensor([0, 5, 6, 2, 4])
    total = 0.0
    for i in range(B):
        for c in range(C):
            q = 1 / (1 + math.exp(-teacher[i, c].item())) if c < n_old else float(y[i].item() == c)
            g = 1 / (1 + math.exp(-logits[i, c].item()))
            total += -(q * math.log(g) + (1 - q) * math.log(1 - g))
    assert icarl_bce(logits, y, teacher).item() == pytest.approx(total / (B * C), rel=1e-5)
    # the first task: one-hot targets on every output
    plain = F.binary_cross_entropy_with_logits(logits, F.one_hot(y, C).float())
    assert icarl_bce(logits, y, None).item() == pytest.approx(plain.item(), rel=1e-6)


class ListContext:
    """The TaskContext of a fixed image tensor: extract runs fn on the rows, in order."""

    def __init__(self, images):
        self.images = images

    def extract(self, indices, fn, augment=False, batch_size=None):
        return torch.cat([fn(self.images[b]) for b in indices.split(3)])

    def batches(self, indices, augment=False, batch_size=None):
        for b in indices.split(batch_size or 4):
            yield self.images[b], b

    def reduce_sum(self, t):
        return t


def _embed():
    torch.manual_seed(1)
    w = torch.randn(2 * 4 * 4, 6)
    return lambda x: x.flatten(1) @ w  # not flip-invariant: the flip changes the features


def test_class_means_average_each_exemplar_with_its_flip():
    torch.manual_seed(0)
    images = torch.randn(10, 2, 4, 4)
    labels_all = torch.tensor([0, 1, 1, 2, 0, 2, 2, 1, 0, 0])
    indices = torch.tensor([9, 1, 2, 3, 4, 5, 0])
    embed = _embed()
    classes, means = class_means(ListContext(images), indices, labels_all[indices], embed, flip=True)
    assert classes.tolist() == [0, 1, 2]
    for k, c in enumerate(classes.tolist()):
        acc, n = torch.zeros(6), 0
        for i in indices.tolist():
            if labels_all[i] != c:
                continue
            a = embed(images[i:i + 1])[0]
            b = embed(images[i:i + 1].flip(3))[0]
            acc += (a / a.norm() + b / b.norm()) / 2
            n += 1
        mu = acc / n
        torch.testing.assert_close(means[k], mu / mu.norm(), rtol=1e-5, atol=1e-6)
    _, plain = class_means(ListContext(images), indices, labels_all[indices], embed, flip=False)
    assert not torch.allclose(plain, means)
    f = embed(images[[1, 2]])
    mu = (f / f.norm(dim=1, keepdim=True)).mean(0)
    torch.testing.assert_close(plain[1], mu / mu.norm(), rtol=1e-5, atol=1e-6)


def test_nme_scores_are_minus_the_distance_to_each_class_mean():
    torch.manual_seed(0)
    images = torch.randn(8, 2, 4, 4)
    labels = torch.tensor([0, 0, 2, 2, 3, 3, 0, 2])
    embed = _embed()
    scorer = NMEScorer()
    scorer.update(ListContext(images), torch.arange(8), labels, embed, num_classes=5)
    feats = torch.randn(6, 6)
    scores = scorer(feats, 5)
    _, means = class_means(ListContext(images), torch.arange(8), labels, embed)
    for i in range(6):
        f = feats[i] / feats[i].norm()
        for c in range(5):
            if c in (1, 4):  # no exemplars: never predicted
                assert scores[i, c] == float("-inf")
            else:
                want = -math.sqrt(sum((f[d] - means[[0, 2, 3].index(c), d]).item() ** 2 for d in range(6)))
                assert scores[i, c].item() == pytest.approx(want, rel=1e-5)
        nearest = min((0, 2, 3), key=lambda c: (f - means[[0, 2, 3].index(c)]).norm().item())
        assert scores[i].argmax().item() == nearest
    # the state round-trips
    other = NMEScorer()
    other.load_state_dict(scorer.state_dict())
    torch.testing.assert_close(other(feats, 5), scores)


# ------------------------------------------------------------------ the method through the engine
def _trainer(tmp_path, *overrides, preset="icarl/digits-b0inc2"):
    cfg, _ = load_config([preset], [*TINY_RESNET, *overrides])
    (tmp_path / "r").mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, tmp_path / "r", progress=False)


def _slow_accuracy(method, scenario, score):
    """Class-IL and task-IL accuracy over all seen test samples, sample by sample."""
    hits = til = n = 0
    for t in range(len(scenario)):
        for i in scenario[t].test_idx.tolist():
            x = scenario.test.images[i:i + 1].float() / 255
            x = (x - torch.tensor(scenario.mean).view(1, -1, 1, 1)) / torch.tensor(scenario.std).view(1, -1, 1, 1)
            s = score(x)[0]
            y = int(scenario.test_labels[i])
            hits += int(s.argmax().item() == y)
            lo, hi = scenario[t].offset, scenario[t].end
            til += int(s[lo:hi].argmax().item() + lo == y)
            n += 1
    return 100 * hits / n, 100 * til / n


@pytest.fixture(scope="module")
def icarl_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("icarl")
    trainer = _trainer(tmp)
    return trainer, trainer.fit(), tmp / "r"


def test_icarl_run_reports_nme_and_cnn_from_one_pass(icarl_run):
    trainer, res, run_dir = icarl_run
    m = trainer.method
    assert res["tasks_done"] == 3 and set(res["extra"]) == {"cnn"}
    assert len(m.memory) == 40 // 10 * 10
    nme, cnn = res["class_il"], res["extra"]["cnn"]["class_il"]
    assert 25 < nme["last"] <= 100 and 25 < cnn["last"] <= 100  # 10 digits: chance is 10
    m.model.eval()
    with torch.no_grad():
        feats = lambda x: m.model.backbone(x)  # noqa: E731
        want_nme = _slow_accuracy(m, trainer.scenario, lambda x: m.nme(feats(x), m.seen))
        want_cnn = _slow_accuracy(m, trainer.scenario, lambda x: m.model.head(feats(x)))
    assert nme["seen_acc"][-1] == pytest.approx(want_nme[0], abs=1e-6)
    assert res["task_il"]["seen_acc"][-1] == pytest.approx(want_nme[1], abs=1e-6)
    assert cnn["seen_acc"][-1] == pytest.approx(want_cnn[0], abs=1e-6)
    assert res["extra"]["cnn"]["task_il"]["seen_acc"][-1] == pytest.approx(want_cnn[1], abs=1e-6)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in records if r["kind"] == "task_end"]
    assert [set(r["extra"]) for r in ends] == [{"cnn"}] * 3
    assert set(ends[0]["extra"]["cnn"]) == {"class_il", "class_il_topk", "task_il", "seen_class_il",
                                            "seen_class_il_topk", "seen_task_il"}
    json.loads((run_dir / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_report_prints_a_row_per_extra_scorer(icarl_run, capsys):
    _, res, run_dir = icarl_run
    assert main(["report", str(run_dir)]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith(("| r |", "| r ("))]
    assert len(rows) == 2 and rows[1].startswith("| r (cnn) | icarl (cnn) |")
    assert f"| {res['extra']['cnn']['class_il']['last']:.2f} |" in rows[1]
    assert f"| {res['class_il']['last']:.2f} |" in rows[0]


def test_classifier_option_swaps_main_and_extra_scores(icarl_run):
    trainer, _, _ = icarl_run
    m = trainer.method
    x = torch.randn(4, *trainer.scenario.test.images.shape[1:])
    m.model.eval()
    with torch.no_grad():
        main_scores, extra = m.scores(x)
        m.opts.classifier = "cnn"
        try:
            cnn_main, cnn_extra = m.scores(x)
            assert m.extra_scorers() == ("nme",)
        finally:
            m.opts.classifier = "nme"
    torch.testing.assert_close(cnn_main, extra["cnn"])
    torch.testing.assert_close(cnn_extra["nme"], main_scores)
    torch.testing.assert_close(main_scores, m.nme(m.model.backbone(x), m.seen))


def test_runs_without_extra_scorers_keep_their_records(tmp_path):
    cfg, _ = load_config(["replay/digits-b0inc2"], ["model.name=resnet18", *TINY_RESNET, *QUICK])
    (tmp_path / "r").mkdir()
    trainer = Trainer(cfg, tmp_path / "r", progress=False)
    res = trainer.fit()
    assert "extra" not in res
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all("extra" not in r for r in records)


def test_icarl_needs_a_memory_and_bce_needs_hard_labels():
    with pytest.raises(ConfigError, match="memory.size"):
        load_config(["icarl/digits-b0inc2"], ["memory.size=0"])
    with pytest.raises(ConfigError, match="mixup_alpha"):
        load_config(["icarl/digits-b0inc2"], ["data.augment.mixup_alpha=0.8"])
    load_config(["icarl/digits-b0inc2"], ["data.augment.mixup_alpha=0.8", "method.distillation=kd"])


def test_icarl_on_a_tiny_vit(tmp_path):
    vit = ["model.name=vit", "model.patch_size=4", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
           "data.increment=[5,5]", "data.augment.crop_padding=0", "train.optimizer=adamw", "train.lr=1e-2",
           "train.weight_decay=0.01", "train.epochs=6"]
    res = _trainer(tmp_path, *vit, "method.distillation=kd").fit()
    assert res["model"] == "vit" and res["class_il"]["last"] > 30 and res["extra"]["cnn"]["class_il"]["last"] > 25


def test_digits_preset_from_the_cli(tmp_path):
    out = run_cli("run", "icarl/digits-b0inc2", *TINY_RESNET, *QUICK, f"run.out_dir={tmp_path}",
                  "run.name=cli", "-q", check=True).stdout
    assert "cnn scores" in out
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["method"] == "icarl"


# ------------------------------------------------------------------ presets and the tables' #P
PRESETS = ["icarl/cifar100-b0inc10", "icarl/cifar100-b0inc5", "icarl/cifar100-b0inc2",
           "icarl/imagenet100-b0inc10", "icarl/imagenet1000-b0inc100"]


@pytest.mark.parametrize("preset,steps,want", [
    ("icarl/cifar100-b0inc10", 10, 11.22), ("icarl/cifar100-b0inc5", 20, 11.22),
    ("icarl/cifar100-b0inc2", 50, 11.22), ("icarl/imagenet100-b0inc10", 10, 11.22),
    ("icarl/imagenet1000-b0inc100", 10, 11.68)])
def test_presets_build_and_give_the_tables_params(preset, steps, want):
    cfg, _ = load_config([preset])
    assert cfg.memory.size == 2000 and cfg.memory.selection == "herding" and cfg.model.name == "resnet18"
    rows, scenario = param_rows(cfg)
    assert len(rows) == steps
    assert math.floor(rows[-1]["total"] / 1e4) / 100 == want  # DyTox's tables truncate to two decimals


def test_params_cli_on_the_ten_step_preset(capsys):
    assert main(["params", "icarl/cifar100-b0inc10"]) == 0
    last = capsys.readouterr().out.splitlines()[-1].split()
    assert last[:4] == ["10", "100", "11,220,132", "11.22"]  # ResNet-18, CIFAR stem, + 512 x 100 + 100 head


def test_method_builds_on_the_presets_scenario_shapes():
    cfg, _ = load_config(["icarl/cifar100-b0inc10"], ["model.width=4"])
    scenario = build_scenario(cfg.data, shapes_only=True)
    m = METHODS.get("icarl")(cfg, scenario, torch.device("meta"))
    assert m.extra_scorers() == ("cnn",)


def test_checkpoint_restores_the_class_means_and_the_teacher(icarl_run):
    trainer, _, run_dir = icarl_run
    m = trainer.method
    x = torch.randn(4, *trainer.scenario.test.images.shape[1:])
    m.model.eval()
    with torch.no_grad():
        main_scores, extra = m.scores(x)
        teacher = m.teacher(x)
    fresh = Trainer(trainer.cfg, run_dir, progress=False)
    restored = dict(fresh.restore_task_checkpoints())
    assert sorted(restored) == [0, 1, 2]
    r = fresh.method
    r.model.eval()
    with torch.no_grad():
        again, again_extra = r.scores(x)
        torch.testing.assert_close(r.teacher(x), teacher)
    torch.testing.assert_close(again, main_scores)
    torch.testing.assert_close(again_extra["cnn"], extra["cnn"])
