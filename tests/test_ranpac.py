"""RanPAC: the classifier accumulated task by task equals one least-squares solve on all the data; the lambda
search against a transcription of the reference's optimise_ridge_parameter; the projection fixed across tasks and
resume; the frozen backbone and the first-session adapter; the parameter count; the presets."""
import pytest
import torch
import torch.nn.functional as F

from vitcl.cli import main, param_rows
from vitcl.data.build import build_scenario
from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.methods import METHODS
from vitcl.methods.ranpac import gaussian_projection, ridge_grid, seed_of, select_ridge
from vitcl.runconfig import load_config

TINY = ["method.name=ranpac", "model.name=vit", "model.patch_size=4", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "model.pool=token", "model.pretrained=null", "method.bottleneck=4",
        "method.projection_dim=48", "method.solve_dtype=float64", "data.train_per_class=20",
        "data.test_per_class=8", "data.increment=[4,3,3]", "data.augment.crop_padding=0", "train.optimizer=sgd",
        "train.lr=0.05", "train.weight_decay=0.0005", "train.min_lr=0", "train.epochs=2", "train.batch_size=16",
        "train.warmup_epochs=0", "eval.batch_size=64", "memory.size=0"]


class FeatureTable:
    """A TaskContext whose extraction returns fixed features per train row (the backbone stands aside)."""

    def __init__(self, feats):
        self.feats = feats

    def extract(self, indices, fn, augment=False, batch_size=None):
        return self.feats[indices]


def _method(overrides):
    cfg, _ = load_config(["data/digits-b0inc2"], TINY + overrides)
    scenario = build_scenario(cfg.data)
    return METHODS.get("ranpac")(cfg, scenario, torch.device("cpu")), scenario


# ------------------------------------------------------------------ the closed form
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-6), ("float32", 2e-4)])  # W_o is kept in float32
def test_accumulated_classifier_is_one_least_squares_solve_on_all_data(dtype, tol):
    """After each task, W_o = (G + lam I)^-1 C over every task so far equals the minimiser of
    ||H W - Y||^2 + lam ||W||^2 on all rows at once, solved by lstsq on [H; sqrt(lam) I] W = [Y; 0]."""
    torch.manual_seed(0)
    lam = 0.7
    m, sc = _method([f"method.ridge={lam}", f"method.solve_dtype={dtype}", "model.pretrained=null"])
    feats = torch.randn(len(sc.train_labels), 16)
    ctx = FeatureTable(feats)
    W = m.model.projection.double()
    for task in sc:
        m.begin_task(task)
        m.consolidate(task, ctx)
        rows = torch.cat([sc[t].train_idx for t in range(task.index + 1)])
        H = F.relu(feats[rows].double() @ W)
        Y = F.one_hot(sc.train_labels[rows], task.end).double()
        M = H.shape[1]
        A = torch.cat([H, lam ** 0.5 * torch.eye(M, dtype=torch.float64)])
        B = torch.cat([Y, torch.zeros(M, task.end, dtype=torch.float64)])
        want = torch.linalg.lstsq(A, B).solution
        got = m.model.classifier.double()
        assert got.shape == (M, task.end)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert m.ridges == [lam] * 3


def reference_ridge(Features, Y, exps=range(-8, 9)):
    """optimise_ridge_parameter of RanPAC/RanPAC (RanPAC.py) in float64: fit on the first int(0.8 N) rows, mean
    squared error over the rest, element by element; the first lambda of the lowest error."""
    ridges = [10.0 ** e for e in exps]
    n = int(Features.shape[0] * 0.8)
    Q = Features[:n].T @ Y[:n]
    G = Features[:n].T @ Features[:n]
    losses = []
    for r in ridges:
        Wo = (torch.linalg.inv(G + r * torch.eye(G.shape[0], dtype=G.dtype)) @ Q).T
        pred = Features[n:] @ Wo.T
        err, count = 0.0, 0
        for i in range(pred.shape[0]):
            for j in range(pred.shape[1]):
                err += (pred[i, j] - Y[n + i, j]).item() ** 2
                count += 1
        losses.append(err / count)
    best = min(range(len(ridges)), key=lambda i: losses[i])
    return ridges[best], losses


def test_ridge_selection_matches_the_reference():
    torch.manual_seed(3)
    N, M, K = 60, 40, 5  # fewer fit rows (48) than a well-determined fit needs: an interior lambda wins
    H = F.relu(torch.randn(N, 8, dtype=torch.float64) @ torch.randn(8, M, dtype=torch.float64))
    beta = torch.randn(M, K, dtype=torch.float64)
    Y = H @ beta + 3 * torch.randn(N, K, dtype=torch.float64)
    lam, losses = select_ridge(H, Y, ridge_grid(-8, 8), 0.8)
    want, want_losses = reference_ridge(H, Y)
    assert lam == want and 1e-8 < lam < 1e8  # not an end of the grid: the search decided
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-6, atol=0)
    assert ridge_grid(-8, 8) == [10.0 ** e for e in range(-8, 9)] and len(ridge_grid(-8, 8)) == 17
    with pytest.raises(RuntimeError, match="no fit or no validation rows"):
        select_ridge(H[:1], Y[:1], ridge_grid(-8, 8), 0.8)


def test_each_task_chooses_lambda_on_its_own_shuffled_rows():
    """The reference searches on the current task's features only, in its shuffled loader's order; here the
    order is a permutation of the task's rows drawn from (run.seed, task)."""
    torch.manual_seed(1)
    m, sc = _method(["method.projection_dim=24"])
    feats = torch.randn(len(sc.train_labels), 16)
    ctx = FeatureTable(feats)
    W = m.model.projection.double()
    for task in sc:
        m.begin_task(task)
        m.consolidate(task, ctx)
        g = torch.Generator().manual_seed(seed_of(m.cfg.run.seed, task.index, "ranpac-ridge"))
        order = task.train_idx[torch.randperm(len(task.train_idx), generator=g)]
        H = F.relu(feats[order].double() @ W)
        want, _ = reference_ridge(H, F.one_hot(sc.train_labels[order], sc.num_classes).double())
        assert m.ridges[task.index] == want


def test_projection_is_seeded_gaussian_and_relu_hidden_features():
    P = gaussian_projection(64, 2000, seed_of(0, "ranpac-projection"))
    assert abs(P.mean().item()) < 0.01 and abs(P.std().item() - 1) < 0.01
    torch.testing.assert_close(P, gaussian_projection(64, 2000, seed_of(0, "ranpac-projection")), rtol=0, atol=0)
    assert not torch.equal(P, gaussian_projection(64, 2000, seed_of(1, "ranpac-projection")))
    m, _ = _method([])
    f = torch.randn(5, 16)
    h = m.model.hidden(f)
    for b in range(5):
        for k in range(48):
            assert h[b, k].item() == pytest.approx(max(0.0, float(f[b] @ m.model.projection[:, k])), abs=1e-5)
    m2, _ = _method(["run.seed=1"])
    assert not torch.equal(m.model.projection, m2.model.projection)
    none, _ = _method(["method.projection_dim=0"])
    torch.testing.assert_close(none.model.hidden(f), f)  # the reference's M = 0: no projection
    assert none.model.classifier.shape == (16, 0)


# ------------------------------------------------------------------ a tiny run on digits
@pytest.fixture(scope="module")
def ranpac_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranpac")
    cfg, _ = load_config(["data/digits-b0inc2"], TINY)
    trainer = Trainer(cfg, tmp, progress=False)
    start = {k: v.clone() for k, v in trainer.method.model.state_dict().items()}
    res = trainer.fit()
    return trainer, res, start, tmp


def _normalised(scenario, images):
    x = images.float() / 255
    return (x - torch.tensor(scenario.mean).view(1, -1, 1, 1)) / torch.tensor(scenario.std).view(1, -1, 1, 1)


def _features(method, scenario, rows):
    """The frozen model's class-token features of train rows, one image at a time."""
    model = method.model.eval()
    with torch.no_grad():
        return torch.cat([model.backbone(_normalised(scenario, scenario.train.images[r:r + 1])) for r in rows])


def test_run_learns_and_only_the_first_session_adapter_ever_trains(ranpac_run):
    trainer, res, start, run_dir = ranpac_run
    assert res["tasks_done"] == 3 and res["class_il"]["last"] > 30  # 10 digits: chance is 10
    now = trainer.method.model.state_dict()
    plain = {k.replace(".block.", "."): v for k, v in now.items() if ".adapters." not in k}
    for k, v in start.items():  # the pretrained backbone and the projection: bit for bit
        if k.startswith("backbone.") or k == "projection":
            torch.testing.assert_close(plain[k], v, rtol=0, atol=0, msg=k)
    adapters = {k: v for k, v in now.items() if ".adapters." in k}
    assert adapters and all(".adapters.0." in k for k in adapters)  # one adapter, from the first session
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("up.weight"))  # it trained
    fresh = Trainer(trainer.cfg, run_dir, progress=False)
    for t, _ in fresh.restore_task_checkpoints():  # frozen after task 0: the same in every task checkpoint
        sd = fresh.method.model.state_dict()
        for k, v in adapters.items():
            torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=f"task {t}: {k}")
        torch.testing.assert_close(sd["projection"], start["projection"], rtol=0, atol=0)
        assert sd["classifier"].shape == (48, trainer.scenario[t].end)


def test_classifier_of_the_run_is_the_ridge_solution_on_all_seen_data(ranpac_run):
    trainer, _, _, _ = ranpac_run
    m, sc = trainer.method, trainer.scenario
    rows = torch.cat([sc[t].train_idx for t in range(3)])
    H = F.relu(_features(m, sc, rows.tolist()).double() @ m.model.projection.double())
    Y = F.one_hot(sc.train_labels[rows], 10).double()
    lam = m.ridges[-1]
    want = torch.linalg.solve(H.T @ H + lam * torch.eye(H.shape[1], dtype=torch.float64), H.T @ Y)
    torch.testing.assert_close(m.model.classifier.double(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    torch.testing.assert_close(m.G, H.T @ H, rtol=1e-5, atol=1e-5 * m.G.abs().max().item())
    x = _normalised(sc, sc.test.images[:5])
    with torch.no_grad():
        scores = m.logits(x)
    h = F.relu(m.model.backbone(x).double() @ m.model.projection.double())
    torch.testing.assert_close(scores.double(), h @ m.model.classifier.double(), rtol=1e-5, atol=1e-5)


def test_first_session_trains_adapter_and_head_only_with_the_backbone_in_eval(ranpac_run):
    trainer, _, _, _ = ranpac_run
    m, task = trainer.method, trainer.scenario[0]
    assert [p.name for p in m.phases(task)] == ["train"]
    assert all(m.phases(trainer.scenario[t]) == [] for t in (1, 2))
    m.setup_phase(m.phases(task)[0], task)
    trainable = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.0." in n or n.startswith("head.") for n in trainable)
    assert {n for n in trainable if n.startswith("head.")} == {"head.weight", "head.sigma"}
    m.model.train()
    for name, mod in m.model.backbone.named_modules():
        assert mod.training == ("adapters.0" in name), name
    m.model.requires_grad_(False)  # back to the frozen state the run's consolidate left
    m.model.eval()


def test_resume_restores_the_matrices_and_accumulation_continues(ranpac_run):
    trainer, _, _, run_dir = ranpac_run
    m, sc = trainer.method, trainer.scenario
    x = _normalised(sc, sc.test.images[:6])
    m.model.eval()
    with torch.no_grad():
        want = m.logits(x)
    fresh = Trainer(trainer.cfg, run_dir, progress=False)
    restored = {t: (fresh.method.G.clone(), fresh.method.C.clone(), list(fresh.method.ridges))
                for t, _ in fresh.restore_task_checkpoints()}
    assert sorted(restored) == [0, 1, 2]
    r = fresh.method
    r.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(r.logits(x), want)
    torch.testing.assert_close(r.G, m.G, rtol=0, atol=0)
    torch.testing.assert_close(r.C, m.C, rtol=0, atol=0)
    assert r.ridges == m.ridges and len(m.ridges) == 3
    # task 2's checkpoint holds task 1's matrices plus task 2's rows, and nothing else
    H2 = F.relu(_features(m, sc, sc[2].train_idx.tolist()).double() @ m.model.projection.double())
    G1, C1, _ = restored[1]
    torch.testing.assert_close(m.G - G1, H2.T @ H2, rtol=1e-5, atol=1e-5 * m.G.abs().max().item())
    Y2 = F.one_hot(sc.train_labels[sc[2].train_idx], 10).double()
    torch.testing.assert_close(m.C - C1, H2.T @ Y2, rtol=1e-5, atol=1e-5 * m.C.abs().max().item())


def test_without_a_first_session_nothing_trains(tmp_path):
    cfg, _ = load_config(["data/digits-b0inc2"], TINY + ["method.first_session=none", "data.increment=[5,5]"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    start = {k: v.clone() for k, v in trainer.method.model.backbone.state_dict().items()}
    res = trainer.fit()
    m = trainer.method
    assert res["tasks_done"] == 2 and m.model.head is None
    assert all(m.phases(t) == [] for t in trainer.scenario)
    for k, v in m.model.backbone.state_dict().items():
        torch.testing.assert_close(v, start[k], rtol=0, atol=0, msg=k)
    assert m.count_parameters().trainable == 0


# ------------------------------------------------------------------ parameter count, presets
def test_parameter_count():
    """Backbone + adapter (+ the head in the first session) + projection d x M + classifier M x seen."""
    cfg, _ = load_config(["data/digits-b0inc2"], TINY)
    rows, _ = param_rows(cfg)
    D, r, depth, M = 16, 4, 2, 48
    adapter = depth * (D * r + r + r * D + D)
    m = METHODS.get("ranpac")(cfg, build_scenario(cfg.data, shapes_only=True), torch.device("cpu"))
    vit = sum(p.numel() for p in m.model.backbone.parameters())
    head = 4 * D + 1
    assert rows[0]["total"] == vit + adapter + head + D * M + M * 4
    assert rows[0]["trainable"] == adapter + head
    for t, seen in ((1, 7), (2, 10)):
        assert rows[t]["total"] == vit + adapter + D * M + M * seen
        assert rows[t]["trainable"] == 0
    cfg, _ = load_config(["data/digits-b0inc2"], TINY + ["method.first_session=none"])
    rows, _ = param_rows(cfg)
    assert [row["total"] for row in rows] == [vit + D * M + M * s for s in (4, 7, 10)]
    assert all(row["trainable"] == 0 for row in rows)


def test_presets_load_and_bad_options_are_refused():
    for preset in ("ranpac/cifar100-b0inc5-vitb16in21k", "ranpac/cifar100-b0inc10-vitb16in21k",
                   "ranpac/fashion-mnist-b0inc2-pretrained"):
        cfg, _ = load_config([preset])
        assert cfg.method.name == "ranpac" and cfg.model.name == "vit" and cfg.model.pool == "token"
    cfg, _ = load_config(["ranpac/cifar100-b0inc5-vitb16in21k"])
    t, o = cfg.train, cfg.method
    assert (t.lr, t.epochs, t.batch_size, t.weight_decay, t.schedule) == (0.01, 20, 48, 0.0005, "cosine")
    assert (o.projection_dim, o.bottleneck, o.first_session, cfg.data.increment) == (10000, 64, "adapter", 5)
    assert (o.ridge, o.ridge_min_exp, o.ridge_max_exp, o.ridge_fit_fraction, o.solve_dtype) == (None, -8, 8, 0.8, "float32")
    assert load_config(["ranpac/cifar100-b0inc10-vitb16in21k"])[0].data.increment == 10
    assert load_config(["ranpac/fashion-mnist-b0inc2-pretrained"])[0].model.pretrained is None
    with pytest.raises(ConfigError, match="model.name"):
        load_config(["ranpac/fashion-mnist-b0inc2-pretrained"], ["model.name=resnet18"])
    for bad, key in (("method.ridge=-1", "method.ridge"), ("method.projection_dim=-2", "method.projection_dim"),
                     ("method.ridge_fit_fraction=1", "method.ridge_fit_fraction"),
                     ("method.ridge_min_exp=9", "method.ridge_min_exp"), ("method.first_session=vpt",
                                                                         "method.first_session")):
        with pytest.raises(ConfigError, match=key):
            load_config(["ranpac/fashion-mnist-b0inc2-pretrained"], [bad])


def test_params_cli_on_vit_b16(capsys):
    assert main(["params", "ranpac/cifar100-b0inc5-vitb16in21k", "model.pretrained=null"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first, second, last = lines[-20].split(), lines[-19].split(), lines[-1].split()
    assert first[0] == "1" and last[0] == "20"
    total = [int(v[2].replace(",", "")) for v in (first, second, last)]
    adapter = 12 * (768 * 64 + 64 + 64 * 768 + 768)
    assert int(first[4].replace(",", "")) == adapter + 5 * 768 + 1 and second[4] == last[4] == "0"
    # the first session's head goes; each task adds 5 classes x M = 10000 to the classifier
    assert total[1] - total[0] == 5 * 10000 - (5 * 768 + 1) and total[2] - total[1] == 18 * 5 * 10000
