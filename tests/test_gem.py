"""GEM and A-GEM: the projections against a brute-force solution of the primal QP and the A-GEM formula, the
constraints holding on the gradients a run steps with, tiny runs, the presets and the config checks."""
import itertools

import pytest
import torch

from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.methods.agem import agem_project
from vitcl.methods.gem import flat_grad, loss_gradient, project_to_cone
from vitcl.runconfig import load_config

TINY = ["run.threads=1", "data.train_per_class=24", "data.test_per_class=10", "data.increment=[4,3,3]",
        "memory.size=30", "train.epochs=1", "train.max_batches=3", "train.batch_size=16", "eval.batch_size=64"]


def primal_by_active_sets(g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """min ||z - g||^2 s.t. rows @ z >= 0, by trying every set S of active constraints: z = g + rows_S^T lam with
    rows_S z = 0 (the KKT conditions); the feasible z with lam >= 0 closest to g."""
    g, rows = g.double(), rows.double()
    best = None
    for k in range(len(rows) + 1):
        for active in itertools.combinations(range(len(rows)), k):
            z = g.clone()
            if active:
                a = rows[list(active)]
                lam = -torch.linalg.solve(a @ a.T, a @ g)
                if (lam < -1e-12).any():
                    continue
                z = g + a.T @ lam
            if (rows @ z >= -1e-9).all() and (best is None or (z - g).norm() < (best - g).norm()):
                best = z
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(6))
def test_gem_projection_is_the_primal_qp_solution(seed):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    g = -rows.sum(0) + 0.3 * torch.randn(7, generator=gen, dtype=torch.float64)  # violates some constraints
    assert (rows @ g < 0).any()
    got = project_to_cone(g, rows, margin=0.0, eps=0.0)
    assert (rows @ got >= -1e-9).all()
    torch.testing.assert_close(got, primal_by_active_sets(g, rows), atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_gem_margin_pushes_every_constraint_past_zero(seed):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    g = -rows[:2].sum(0)
    got = project_to_cone(g, rows, margin=0.5, eps=0.0)
    # the dual's optimality: G g~ >= 0, and = 0 only where v is above the margin; v >= margin moves g further
    assert (rows @ got >= -1e-9).all()
    plain = project_to_cone(g, rows, margin=0.0, eps=0.0)
    assert (rows @ got).sum() > (rows @ plain).sum()


def test_agem_projection_is_the_formula():
    gen = torch.Generator().manual_seed(0)
    g, ref = torch.randn(11, generator=gen, dtype=torch.float64), torch.randn(11, generator=gen, dtype=torch.float64)
    if g @ ref > 0:
        ref = -ref
    want = torch.tensor([g[i] - (g @ ref).item() / (ref @ ref).item() * ref[i] for i in range(11)])
    got = agem_project(g, ref)
    torch.testing.assert_close(got, want.double())
    assert abs(float(got @ ref)) < 1e-10
    assert torch.equal(agem_project(g, -ref), g)  # no conflict: the gradient as it is


@pytest.mark.parametrize("images", ["augmented", "plain"])
def test_gem_run_steps_with_gradients_that_keep_every_past_task(tmp_path, images):
    cfg, _ = load_config(["gem/digits-b0inc2"], [*TINY, "method.eps=0", f"method.memory_images={images}"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    m = trainer.method
    original, worst, calls, drawn = m.before_step, [], [], []

    def checked(batches, phase, task):
        original(batches, phase, task)
        if not len(m.memory):
            return
        calls.append(task.index)
        x, y, rows = m.memory_images(batches)
        drawn.append(sorted(rows.tolist()) == sorted(m.memory.indices().tolist()))
        params = m.trainable()
        g = flat_grad(params)
        past = m.scenario.task_of_label[m.scenario.train_labels[rows]]
        assert past.unique().tolist() == list(range(task.index))
        for k in range(task.index):
            gk = loss_gradient(m.model, params, x[past == k], y[past == k])
            worst.append(float(g @ gk) / float(gk.norm() * g.norm()))

    m.before_step = checked
    res = trainer.fit()
    assert res["tasks_done"] == 3 and calls.count(1) == 3 and calls.count(2) == 3
    assert all(drawn)  # the constraints cover the whole memory at every step
    assert min(worst) > -1e-4  # BatchNorm's running statistics move between the two passes; train-mode stats don't
    assert len(m.memory) == 30 and m.images.shape[0] == (30 if images == "plain" else 0)


def test_gem_draws_the_memory_through_the_training_augmentation(tmp_path):
    """memory_images augmented (Mammoth's get_data with the training transform): the images of the same rows
    differ from step to step; plain: the kept test-transformed images."""
    cfg, _ = load_config(["gem/digits-b0inc2"], TINY)
    trainer = Trainer(cfg, tmp_path, progress=False)
    m = trainer.method
    original, seen = m.before_step, []

    def record(batches, phase, task):
        x, _, rows = m.memory_images(batches)
        if task.index == 1:
            seen.append(x[torch.argsort(rows)].clone())
        original(batches, phase, task)

    m.before_step = record
    trainer.fit()
    assert len(seen) == 3 and not torch.equal(seen[0], seen[1])
def test_agem_run_draws_its_reference_batch(tmp_path):
    cfg, _ = load_config(["agem/digits-b0inc2"], TINY)
    trainer = Trainer(cfg, tmp_path, progress=False)
    phases = trainer.method.phases(trainer.scenario[0])
    assert [(p.data, p.memory_batch) for p in phases] == [("task", 16)]
    res = trainer.fit()
    assert res["tasks_done"] == 3 and len(trainer.method.memory) == 30


@pytest.mark.parametrize("method", ["gem", "agem"])
def test_gem_and_agem_need_a_memory(method):
    with pytest.raises(ConfigError, match="memory.size"):
        load_config([f"{method}/digits-b0inc2"], ["memory.size=0"])


@pytest.mark.parametrize("preset", [f"{m}/cifar100-{t}tasks-m{s}" for m in ("gem", "agem", "fdr", "icarl")
                                    for t in (5, 10, 20) for s in (200, 500)])
def test_lvt_table_presets_run_lvts_recipe(preset):
    cfg, _ = load_config([preset])
    tasks = int(preset.split("-")[1].removesuffix("tasks"))
    assert cfg.data.increment == 100 // tasks and cfg.memory.size == int(preset.rsplit("m", 1)[1])
    assert (cfg.model.name, cfg.model.stem, cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size,
            cfg.train.epochs) == ("resnet18", "cifar", "sgd", 0.1, 32, 50)
