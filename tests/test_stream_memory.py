"""The memory updated per batch (data/stream_memory.py) and the methods that stream into it: ER, DER, DER++."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import SRC, TINY, interrupt_at_epoch, restored
from vitcl.data.stream_memory import ClassBalancedReservoir, Reservoir, StreamMemory, stream_uniform
from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.methods import Batch
from vitcl.methods.losses import stored_logits_mse
from vitcl.runconfig import load_config


def stream(memory: StreamMemory, rows: torch.Tensor, labels: torch.Tensor, batch: int, extras=None) -> None:
    """Stream `rows` as one epoch of global batches of `batch` rows, positions in order."""
    memory.begin_epoch()
    for start in range(0, len(rows), batch):
        part = slice(start, start + batch)
        memory.observe(rows[part], labels[part], torch.zeros(len(rows[part]), dtype=torch.long),
                       torch.arange(start, start + len(rows[part])),
                       None if extras is None else {k: v[part] for k, v in extras.items()})


def test_stream_uniform_is_uniform_and_seeded():
    draws = torch.tensor([stream_uniform(3, n, 7) for n in range(7000)])
    counts = torch.bincount(draws, minlength=7).float()
    chi2 = float(((counts - 1000) ** 2 / 1000).sum())
    assert chi2 < 35.0  # 6 degrees of freedom: p < 1e-5
    assert [stream_uniform(3, n, 7) for n in range(50)] == draws[:50].tolist()
    assert [stream_uniform(4, n, 7) for n in range(50)] != draws[:50].tolist()


def test_reservoir_keeps_every_sample_with_probability_m_over_n():
    M, n, runs = 10, 60, 3000
    counts = torch.zeros(n)
    for seed in range(runs):
        memory = StreamMemory(M, Reservoir(seed))
        stream(memory, torch.arange(n), torch.zeros(n, dtype=torch.long), batch=7)
        assert memory.filled == M and len(memory.indices().unique()) == M
        counts[memory.indices()] += 1
    p = M / n
    sd = math.sqrt(runs * p * (1 - p))
    assert (counts - runs * p).abs().max() < 6 * sd  # binomial bound, each sample at p < 1e-8
    assert counts.sum() == runs * M


def test_reservoir_counts_the_stream_over_epochs():
    """Vitter's algorithm R over a stream of two epochs: the stream index goes on counting (Mammoth's
    num_seen_examples), so the second epoch's samples enter with probability M / (n + 1) at index n."""
    M, n = 5, 20
    memory = StreamMemory(M, Reservoir(0))
    rows = torch.arange(n)
    stream(memory, rows, torch.zeros(n, dtype=torch.long), batch=4)
    stream(memory, rows, torch.zeros(n, dtype=torch.long), batch=4)
    assert memory.streamed == 2 * n
    expected = torch.arange(M).clone()  # a transcription of algorithm R, sample by sample
    for i in range(M, 2 * n):
        j = stream_uniform(0, i, i + 1)
        if j < M:
            expected[j] = i % n
    assert torch.equal(memory.rows, expected)


def test_the_same_memory_whatever_the_split_of_a_step():
    """Micro-batches, rank shares in any row order, one call: the decisions depend only on the positions."""
    n, M = 64, 12
    rows, labels = torch.randperm(1000)[:n], torch.randint(0, 4, (n,))
    logits = torch.randn(n, 4)
    whole = StreamMemory(M, Reservoir(5))
    stream(whole, rows, labels, batch=16, extras={"logits": logits})
    split = StreamMemory(M, Reservoir(5))
    split.begin_epoch()
    for start in range(0, n, 16):
        pos = torch.arange(start, start + 16)
        perm = torch.randperm(16)  # a gather of two ranks' interleaved shares, in another row order
        split.observe(rows[pos][perm], labels[pos][perm], torch.zeros(16, dtype=torch.long), pos[perm],
                      {"logits": logits[pos][perm]})
    assert torch.equal(whole.rows, split.rows) and torch.equal(whole.labels, split.labels)
    assert torch.equal(whole.extras["logits"], split.extras["logits"])
    stored = whole.extras["logits"][: whole.filled]
    where = {int(r): i for i, r in enumerate(rows)}
    assert torch.equal(stored, logits[[where[int(r)] for r in whole.indices()]])


def test_state_dict_resumes_the_stream_exactly():
    n, M = 50, 8
    rows, labels = torch.arange(n), torch.randint(0, 3, (n,))
    for policy in (Reservoir, ClassBalancedReservoir):
        full = StreamMemory(M, policy(1))
        stream(full, rows, labels, batch=5)
        stream(full, rows, labels, batch=5)
        cut = StreamMemory(M, policy(1))
        stream(cut, rows, labels, batch=5)
        resumed = StreamMemory(M, policy(1))
        resumed.load_state_dict(cut.state_dict())
        stream(resumed, rows, labels, batch=5)
        assert torch.equal(full.rows, resumed.rows) and full.streamed == resumed.streamed


def test_class_balanced_reservoir_balances_an_imbalanced_stream():
    labels = torch.cat([torch.zeros(300), torch.ones(30), torch.full((30,), 2)]).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    memory = StreamMemory(30, ClassBalancedReservoir(0))
    stream(memory, order, labels[order], batch=10)
    counts = memory.class_counts()
    assert sum(counts.values()) == 30 and max(counts.values()) - min(counts.values()) <= 1
    plain = StreamMemory(30, Reservoir(0))
    stream(plain, order, labels[order], batch=10)
    assert plain.class_counts()[0] > 20  # plain reservoir mirrors the stream's imbalance


def test_stored_logits_mse_against_a_transcription():
    logits, stored = torch.randn(5, 6), torch.randn(5, 6)
    n_stored = torch.tensor([2, 4, 6, 6, 4])
    total, count = 0.0, 0
    for i in range(5):
        for c in range(int(n_stored[i])):
            total += float(logits[i, c] - stored[i, c]) ** 2
            count += 1
    assert stored_logits_mse(logits, stored, n_stored).item() == pytest.approx(total / count, rel=1e-5)
    full = torch.full((5,), 6)
    assert stored_logits_mse(logits, stored, full).item() == pytest.approx(F.mse_loss(logits, stored).item(), rel=1e-5)


def _trainer(tmp_path, preset, *overrides):
    cfg, _ = load_config([preset], ["run.progress=false", "train.epochs=1", "train.max_batches=3",
                                    "data.train_per_class=24", "data.test_per_class=10", *overrides])
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, tmp_path / "run", progress=False)


def test_dark_er_pp_loss_against_its_definition(tmp_path):
    tr = _trainer(tmp_path, "dark-er-pp/digits-b0inc2", "method.alpha=0.3", "method.beta=0.7")
    method, task = tr.method, tr.scenario[0]
    method.begin_task(task)
    method.model.eval()  # no batch-norm statistics moving between the two evaluations
    n_classes = tr.scenario.num_classes
    stored = torch.randn(6, n_classes)
    method.memory.begin_epoch()
    method.memory.observe(torch.arange(6), torch.tensor([0, 1, 0, 1, 0, 1]), torch.zeros(6, dtype=torch.long),
                          torch.arange(6), {"logits": stored, "classes": torch.full((6,), n_classes)})
    g = torch.Generator().manual_seed(0)
    shape = next(iter(tr.train_stream([torch.arange(4)], train=False)))[0].shape[1:]
    x, xm, xm2 = (torch.randn(4, *shape, generator=g) for _ in range(3))
    y, ym2 = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 0, 0, 1])
    slots = torch.tensor([5, 2, 0, 3])
    mem = Batch(x=xm, y=torch.tensor([1, 0, 0, 1]), task=torch.zeros(4, dtype=torch.long), index=slots, slot=slots)
    second = Batch(x=xm2, y=ym2, task=torch.zeros(4, dtype=torch.long), index=slots)
    batch = Batch(x=x, y=y, task=torch.zeros(4, dtype=torch.long), index=torch.arange(4), memory=mem,
                  memory_more=[second])
    loss, logs = method.loss(batch, None, task)
    with torch.no_grad():
        f = method.model  # the all-classes head: logits over every class of the scenario
        expected = (F.cross_entropy(f(x), y) + 0.3 * ((f(xm) - stored[slots]) ** 2).mean()
                    + 0.7 * F.cross_entropy(f(xm2), ym2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(logs) == {"ce", "mse", "ce_memory"}


@pytest.mark.parametrize("preset", ["er/digits-b0inc2", "dark-er/digits-b0inc2", "dark-er-pp/digits-b0inc2"])
def test_stream_methods_fill_the_memory_while_training(tmp_path, preset):
    tr = _trainer(tmp_path, preset, "memory.size=40")
    drawn = []
    loss = tr.method.loss

    def spy(batch, phase, task):
        m = batch.memory  # the drawn slots hold the batch's rows (until the step streams new ones in)
        drawn.append((task.index, m, m is None or torch.equal(tr.method.memory.rows[m.slot], m.index)))
        return loss(batch, phase, task)

    tr.method.loss = spy
    res = tr.fit()
    memory = tr.method.memory
    assert len(memory) == 40 and res["tasks_done"] == 5
    assert drawn[0][1] is None  # an empty memory gives no batch at the first step
    later = [m for _, m, _ in drawn[1:] if m is not None]
    assert later and all(len(m.x) == min(32, len(m.slot.unique())) for m in later)
    assert all(ok for _, _, ok in drawn)
    if preset != "er/digits-b0inc2":
        assert memory.extras["logits"].shape == (40, tr.scenario.num_classes)


def test_stream_methods_check_their_memory_config():
    for bad, key in ((["memory.selection=herding"], "memory.selection"), (["memory.size=0"], "memory.size"),
                     (["memory.ranks=2"], "memory.ranks")):
        with pytest.raises(ConfigError, match=key):
            load_config(["er/digits-b0inc2"], bad)


def test_a_stream_run_resumed_mid_task_equals_an_uninterrupted_one(tmp_path):
    opts = ("train.epochs=2", "train.max_batches=3", "data.increment=5")
    full = _trainer(tmp_path / "a", "dark-er/digits-b0inc2", *opts).fit()
    t = _trainer(tmp_path / "b", "dark-er/digits-b0inc2", *opts)
    interrupt_at_epoch(t, 4)  # inside task 1, after its first epoch was checkpointed
    resumed = _trainer(tmp_path / "b", "dark-er/digits-b0inc2", *opts)
    state = restored(resumed, tmp_path / "b" / "run" / "checkpoints" / "last.pt")
    assert (resumed.state.task, resumed.state.epoch) == (1, 1)
    res = resumed.fit(state)
    assert res["class_il"]["acc_matrix"] == full["class_il"]["acc_matrix"]


def test_two_processes_stream_the_same_memory_as_one(tmp_path):
    """Under torchrun every process gathers the step's rows and logits: both hold the same memory, and the rows one
    process holds (the reservoir's decisions depend on the stream positions only)."""
    overrides = [*TINY, "data.increment=5", "memory.size=24", "train.batch_size=16", "method.name=dark-er",
                 "method.memory_batch=8", "memory.selection=reservoir"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).parent / "ddp_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(tmp_path), *overrides], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m0, m1 = (torch.load(tmp_path / f"memory_rank{r}.pt") for r in (0, 1))
    cfg, _ = load_config(["replay/digits-b0inc2"], ["run.progress=false", *overrides])
    (tmp_path / "one").mkdir()
    one = Trainer(cfg, tmp_path / "one", progress=False)
    one.fit()
    single = one.method.memory.state_dict()
    assert m0["filled"] == 24 and m0["streamed"] == single["streamed"]
    assert torch.equal(m0["rows"], m1["rows"]) and torch.equal(m0["rows"], single["rows"])
    assert torch.equal(m0["extras"]["logits"], m1["extras"]["logits"])


def test_gss_policy_against_a_transcription_of_gss_greedy():
    """GSS-Greedy's placement (Mammoth's functional_reservoir) with given scores: fill while the stream is short,
    then draw a slot in proportion to the scores and replace it with probability s / (s + c)."""
    from vitcl.data.stream_memory import GradientSampleSelection, stream_fraction

    M = 6
    memory = StreamMemory(M, GradientSampleSelection(4))
    singles = torch.rand(40, generator=torch.Generator().manual_seed(1)) * 2
    rows = torch.arange(40)
    expected_rows, expected_scores = torch.full((M,), -1), torch.zeros(M, dtype=torch.float64)
    memory.begin_epoch()
    for start, batch_score in zip(range(0, 40, 8), (0.1, 0.5, 1.2, 0.3, 0.9)):
        memory.policy.batch_score = batch_score
        memory.policy.sample_score = lambda i, s=start: float(singles[s + i])
        memory.observe(rows[start: start + 8], torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long),
                       torch.arange(start, start + 8))
        for n in range(start, start + 8):  # the transcription
            if n < M:
                expected_rows[n], expected_scores[n] = n, batch_score
            elif batch_score < 1:
                p = expected_scores / expected_scores.sum()
                u, slot = stream_fraction(4, n), 0
                while slot < M - 1 and u >= float(p[: slot + 1].sum()):
                    slot += 1
                s = float(expected_scores[slot])
                if stream_fraction(5, n) < s / (s + float(singles[n])):
                    expected_rows[slot], expected_scores[slot] = n, float(singles[n])
    assert torch.equal(memory.rows, expected_rows)
    assert torch.allclose(memory.scores, expected_scores)


def test_gss_scores_are_the_largest_cosine_similarity_plus_one(tmp_path):
    tr = _trainer(tmp_path, "gss/digits-b0inc2")
    method = tr.method
    g = torch.randn(50)
    G = torch.randn(7, 50)
    expected = max(float(g @ G[k] / (g.norm() * G[k].norm())) for k in range(7)) + 1
    assert method.score(g, G) == pytest.approx(expected, rel=1e-5)


def test_gss_run_fills_its_memory(tmp_path):
    tr = _trainer(tmp_path, "gss/digits-b0inc2", "memory.size=20", "train.max_batches=2", "train.batch_size=8",
                  "method.memory_batch=4")
    tr.fit()
    memory = tr.method.memory
    assert len(memory) == 20 and (memory.scores[:20] > 0).all()
