"""DyTox's per-rank ("distributed") memory: memory.ranks emulated ranks, each with its own bank
(docs/methods/dytox.md#memory-modes)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SRC, TINY, interrupt_at_epoch, restored
from vitcl.data.memory import FixedTotal, Memory, RandomSelector, RankedMemory, local_ranks, make_memory
from vitcl.engine.trainer import Trainer, stable_seed
from vitcl.errors import ConfigError
from vitcl.methods import Phase
from vitcl.runconfig import load_config

RANKED = [*TINY, "data.increment=5", "memory.size=20", "memory.ranks=2", "memory.features_augment=true"]
FAST = ["train.epochs=1", "train.max_batches=3"]


def make_trainer(run_dir: Path, *overrides: str, preset: str = "replay/digits-b0inc2") -> Trainer:
    cfg, _ = load_config([preset], [*RANKED, "run.progress=false", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, run_dir, progress=False)


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, needle", [
    (["memory.ranks=0"], "memory.ranks: expected a positive integer"),
    (["memory.ranks=3"], "memory.ranks: 3 emulated ranks must divide train.batch_size 16"),
])
def test_bad_ranks_are_config_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(["replay/digits-b0inc2"], [*TINY, *overrides])


def test_each_process_holds_a_contiguous_block_of_ranks():
    assert local_ranks(4, 0, 2) == [0, 1] and local_ranks(4, 1, 2) == [2, 3] and local_ranks(2, 1, 2) == [1]
    with pytest.raises(ConfigError, match="memory.ranks: 3 emulated ranks do not split over 2 processes"):
        local_ranks(3, 0, 2)
    assert isinstance(make_memory(FixedTotal(10), "random", 0, 1), Memory)
    ranked = make_memory(FixedTotal(10), "random", 0, 4, rank=1, world=2)
    assert isinstance(ranked, RankedMemory) and ranked.local == [2, 3] and ranked.ranks == 4


# --------------------------------------------------------------------------------------------- the banks
def _ranked(n: int = 2) -> RankedMemory:
    return RankedMemory(FixedTotal(6), [RandomSelector(seed=r) for r in range(n)], list(range(n)))


def test_ranked_memory_reads_across_its_local_banks_and_round_trips():
    mem = _ranked()
    cand, labels = torch.arange(100, 120), torch.tensor([0] * 10 + [1] * 10)
    for r, bank in enumerate(mem.banks):
        bank.add(cand, labels, None, 2, extras={"z": cand.float()[:, None] * 10 + r})
    b0, b1 = mem.banks[0].indices(), mem.banks[1].indices()
    assert not torch.equal(b0, b1)  # seeded per bank
    assert torch.equal(mem.indices(), torch.cat([b0, b1])) and len(mem) == 12
    rows = torch.cat([b1[:2], b0[:2]])
    z = mem.lookup("z", rows).flatten()
    # a row both banks hold comes from the first local bank, one only bank 1 holds from bank 1
    expected = [float(x) * 10 + (0 if bool(torch.isin(x, b0)) else 1) for x in rows]
    assert z.tolist() == expected
    with pytest.raises(KeyError):
        mem.lookup("z", torch.tensor([5]))
    with pytest.raises(TypeError):
        mem.add(cand, labels, None, 2)
    other = _ranked()
    other.load_state_dict(mem.state_dict())
    assert all(torch.equal(a.indices(), b.indices()) for a, b in zip(mem.banks, other.banks))
    with pytest.raises(ValueError, match="memory.ranks is 3"):
        _ranked(3).load_state_dict(mem.state_dict())


def _features(trainer: Trainer, rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The selection features of `rows`, batch by batch of eval.batch_size: a direct loop."""
    out = []
    trainer.method.model.eval()
    with torch.no_grad():
        for chunk in rows.split(trainer.cfg.eval.batch_size):
            x = trainer.scenario.train.images[chunk]
            x = trainer.augment.train(x, generator) if generator is not None else trainer.augment.test(x)
            out.append(trainer.method.embed(x))
    return torch.cat(out)


@pytest.mark.parametrize("augment", [True, False])
def test_every_bank_herds_on_its_own_feature_draws(tmp_path, augment):
    t = make_trainer(tmp_path, "train.epochs=1", f"memory.features_augment={str(augment).lower()}")
    task = t.scenario[0]
    t.method.begin_task(task)
    t.update_memory(task)
    mem = t.method.memory
    assert isinstance(mem, RankedMemory) and mem.local == [0, 1]
    labels = t.scenario.train_labels[task.train_idx]
    for r, bank in enumerate(mem.banks):
        assert len(bank) == 20  # memory.size per rank
        g = torch.Generator().manual_seed(stable_seed(t.cfg.run.seed, 0, "memory", r)) if augment else None
        expected = Memory(FixedTotal(20), mem.selector)
        expected.add(task.train_idx, labels, _features(t, task.train_idx, g), t.method.seen)
        for c in expected.exemplars:
            assert torch.equal(bank.exemplars[c], expected.exemplars[c]), (r, c)
    same = all(torch.equal(mem.banks[0].exemplars[c], mem.banks[1].exemplars[c]) for c in mem.banks[0].exemplars)
    assert same is not augment  # the test transform: one bank twice; the training augmentation: two banks


# --------------------------------------------------------------------------------------------- the batches
def _slow_plan(sets, n_ranks, batch_size, seed, phase, whole):
    """Each rank's rows step by step, transcribed: rank r orders its own dataset with the shared seed; a step is
    (share mode) rank r's contiguous ceil(B / n)-slice of every B-position global batch, or (whole mode) rank r's
    next B / n positions; the step's rows are the concatenation over the ranks."""
    from vitcl.data.stream import epoch_order

    steps: list[list[int]] = []
    sizes: list[int] = []
    for r, rows in sets:
        order = epoch_order(len(rows), seed, phase.shuffle, phase.repeats, phase.repeat_mode).tolist()
        width = batch_size // n_ranks if whole else batch_size
        s = 0
        for start in range(0, len(order), width):
            batch = order[start:start + width]
            if phase.drop_last and len(batch) < width:
                break
            if whole:
                mine, size = batch, len(batch) * n_ranks
            else:
                per = -(-len(batch) // n_ranks)
                mine, size = batch[r * per:(r + 1) * per], len(batch)
            if s == len(steps):
                steps.append([])
                sizes.append(size)
            steps[s].extend(int(rows[i]) for i in mine)
            s += 1
    return steps, sizes


@pytest.mark.parametrize("data, repeats, drop_last", [("task+memory", 3, False), ("task+memory", 1, True),
                                                      ("memory", 1, False), ("memory", 3, True)])
def test_each_rank_draws_its_share_from_task_and_its_own_bank(tmp_path, data, repeats, drop_last):
    t = make_trainer(tmp_path, "train.batch_size=12")
    task = t.scenario[1]
    mem = t.method.memory
    assert isinstance(mem, RankedMemory)
    labels0 = t.scenario.train_labels[t.scenario[0].train_idx]
    for r, bank in enumerate(mem.banks):
        bank.selector = RandomSelector(seed=r)
        bank.add(t.scenario[0].train_idx, labels0, None, 5)
    phase = Phase.from_train("p", data, t.cfg.train, 1, repeats=repeats, repeat_mode="deit", drop_last=drop_last)
    sets = t.rank_rows(phase, task)
    banks = [set(b.indices().tolist()) for b in mem.banks]
    assert banks[0] != banks[1]
    plan = t.epoch_steps(task, 0, phase, 3, sets)
    steps, sizes = _slow_plan(sets, 2, 12, stable_seed(t.cfg.run.seed, 1, 0, 3, "order"), phase, data == "memory")
    assert [rows.tolist() for rows, _, _ in plan] == steps and [s for _, s, _ in plan] == sizes
    task_rows = set(task.train_idx.tolist())
    first = [rows[: len(rows) // 2] for rows, _, _ in plan]
    second = [rows[len(rows) // 2:] for rows, _, _ in plan]
    for r, part in ((0, first), (1, second)):
        allowed = banks[r] | (task_rows if data == "task+memory" else set())
        assert all(set(x.tolist()) <= allowed for x in part)
    if data == "memory" and repeats == 1:  # every rank iterates all of its own bank each epoch
        for r, part in ((0, first), (1, second)):
            seen = set(torch.cat(part).tolist())
            assert seen == banks[r] or (drop_last and seen < banks[r])


def test_one_rank_is_the_global_memory(tmp_path):
    """memory.ranks=1 gives the plain Memory and the engine's former batches (every rank's share of one order)."""
    t = make_trainer(tmp_path, "memory.ranks=1")
    assert isinstance(t.method.memory, Memory)
    phase = Phase.from_train("p", "task", t.cfg.train, 0)
    (rows, size, positions), *_ = t.epoch_steps(t.scenario[0], 0, phase, 0, t.rank_rows(phase, t.scenario[0]))
    from vitcl.data.stream import epoch_order
    order = epoch_order(len(t.scenario[0].train_idx), stable_seed(t.cfg.run.seed, 0, 0, 0, "order"), True)
    assert torch.equal(rows, t.scenario[0].train_idx[order[:16]]) and size == 16
    assert torch.equal(positions, torch.arange(16))  # the crop keys' positions: the first global batch


# --------------------------------------------------------------------------------------------- runs
def test_dytox_run_with_ranked_memory_resumes_exactly(tmp_path):
    """A tiny DyTox (train + finetune on the banks) with two emulated ranks; stopped inside task 1's finetuning
    and resumed from the checkpoint (all banks in it), it repeats the uninterrupted run."""
    opts = ("model.embed_dim=16", "model.depth=2", "model.local_up_to_layer=1", "model.num_heads=2",
            "method.finetune_epochs=2", "train.max_batches=2")
    full = make_trainer(tmp_path / "a", *opts, preset="dytox/digits-b0inc2").fit()
    t = make_trainer(tmp_path / "b", *opts, preset="dytox/digits-b0inc2")
    interrupt_at_epoch(t, 6)  # task 1: 2 training epochs, then the first finetuning epoch was checkpointed
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["method"]["memory"]["ranks"] == 2 and len(ckpt["method"]["memory"]["banks"]) == 2
    resumed = make_trainer(tmp_path / "b", *opts, preset="dytox/digits-b0inc2")
    opt_state = resumed.restore(ckpt)
    assert (resumed.state.task, resumed.state.phase, resumed.state.epoch) == (1, 1, 1)
    res = resumed.fit(opt_state)
    assert res["class_il"]["acc_matrix"] == full["class_il"]["acc_matrix"]
    banks = resumed.method.memory.banks  # type: ignore[union-attr]
    assert len(banks[0]) == len(banks[1]) == 20 and not torch.equal(banks[0].indices(), banks[1].indices())


def test_two_processes_hold_the_banks_of_two_emulated_ranks(tmp_path):
    """torchrun with 2 gloo processes and memory.ranks=2: each process herds its own bank (then all exchange
    them); one process emulating both ranks from the same weights holds the same banks, in the same order, and
    plans the same training rows (the two processes' shares side by side)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).parent / "ddp_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(tmp_path), *RANKED, *FAST], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m0 = torch.load(tmp_path / "memory_rank0.pt")
    m1 = torch.load(tmp_path / "memory_rank1.pt")
    assert m0["ranks"] == 2
    for b0, b1 in zip(m0["banks"], m1["banks"]):  # synchronised: both processes hold both banks
        assert sorted(b0["exemplars"]) == list(range(10))
        assert all(torch.equal(b0["exemplars"][c], b1["exemplars"][c]) for c in b0["exemplars"])
    bank0, bank1 = (b["exemplars"] for b in m0["banks"])
    assert not all(torch.equal(bank0[c], bank1[c]) for c in bank0)

    t = make_trainer(tmp_path / "single", *FAST)
    restored(t, tmp_path / "run" / "checkpoints" / "task_1.pt")
    task = t.scenario[1]
    mem = t.method.memory
    assert isinstance(mem, RankedMemory) and mem.local == [0, 1]
    for bank in mem.banks:
        for c in task.labels:
            bank.exemplars.pop(c)
    t.update_memory(task)
    for r, bank in enumerate(mem.banks):
        for c, rows in m0["banks"][r]["exemplars"].items():
            assert torch.equal(bank.exemplars[c], rows), (r, c)

    plans = [torch.load(tmp_path / f"plan_rank{r}.pt") for r in (0, 1)]
    phase = t.method.phases(task)[0]
    single = t.epoch_steps(task, 0, phase, 0, t.rank_rows(phase, task))
    assert len(single) == len(plans[0]) == len(plans[1])
    for (rows, size, pos), (r0, s0, p0), (r1, s1, p1) in zip(single, *plans):
        assert torch.equal(rows, torch.cat([r0, r1])) and size == s0 == s1
        assert torch.equal(pos, torch.cat([p0, p1]))  # the same crop draws whatever the process count
