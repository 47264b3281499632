"""DyTox's model ablation (docs/methods/dytox.md#model-ablation): the shared task token, the shared classifier,
their growth, freezing and losses against direct transcriptions, the ablation presets and a tiny run."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from vitcl import cli
from vitcl.data.build import build_scenario
from vitcl.errors import ConfigError
from vitcl.methods import METHODS, Batch
from vitcl.runconfig import load_config

TINY = ["model.patch_size=2", "model.embed_dim=32", "model.num_heads=4", "model.depth=3", "model.local_up_to_layer=2",
        "model.drop_path=0.0", "memory.size=40"]
C = 32
SHARED_BOTH = ["method.task_tokens=shared", "method.heads=shared"]


def make_method(overrides=(), preset="dytox/digits-b0inc2"):
    cfg, _ = load_config([preset], list(TINY) + list(overrides))
    scenario = build_scenario(cfg.data, shapes_only=True)
    torch.manual_seed(0)
    return METHODS.get(cfg.method.name)(cfg, scenario, torch.device("cpu")), scenario


def grown(overrides, n_tasks):
    method, scenario = make_method(overrides)
    for t in range(n_tasks):
        method.begin_task(scenario[t])
    method.model.eval()
    return method, scenario


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def slow_head(x, norm, fc):
    """LayerNorm then Linear, one sample and one class at a time."""
    out = torch.zeros(x.shape[0], fc.out_features, dtype=torch.float64)
    for b in range(x.shape[0]):
        v = x[b].double()
        mu = sum(v[j] for j in range(len(v))) / len(v)
        var = sum((v[j] - mu) ** 2 for j in range(len(v))) / len(v)
        z = [(v[j] - mu) / torch.sqrt(var + norm.eps) * norm.weight[j] + norm.bias[j] for j in range(len(v))]
        for c in range(fc.out_features):
            out[b, c] = sum(fc.weight[c, j] * z[j] for j in range(len(v))) + fc.bias[c]
    return out


def decoder_calls(model):
    """Token counts of every decoder call while the model runs."""
    seen = []
    handle = model.decoder.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    return seen, handle


# --------------------------------------------------------------------------------------------- shared token
@pytest.mark.parametrize("heads", ["independent", "shared"])
def test_shared_token_one_token_one_decoder_pass(heads):
    method, scenario = grown(["method.task_tokens=shared", f"method.heads={heads}"], 4)
    m = method.model
    assert len(m.task_tokens) == 1 and m.num_tasks == 4
    x = torch.randn(3, 1, 8, 8)
    seen, handle = decoder_calls(m)
    logits = method.logits(x)
    handle.remove()
    assert seen == [1]  # one decoder pass, on one token, after four tasks
    assert logits.shape == (3, scenario[3].end)
    e = m.decoder(m.task_tokens[0], m.encoder(x))[:, 0]  # the one class token's embedding
    if heads == "independent":  # each task's classifier on the same embedding
        expected = torch.cat([slow_head(e, h.norm, h.fc) for h in m.heads], 1)
    else:
        expected = slow_head(e, m.heads[0].norm, m.heads[0].fc)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-5)
    assert method.embed(x).shape == (3, C)  # herding features: the one embedding


def test_expanded_tokens_run_the_decoder_once_on_all_tokens():
    method, _ = grown([], 3)
    seen, handle = decoder_calls(method.model)
    method.logits(torch.randn(2, 1, 8, 8))
    handle.remove()
    assert seen == [3]


# --------------------------------------------------------------------------------------------- shared classifier
def test_shared_classifier_on_the_concatenated_embeddings():
    method, scenario = grown(["method.heads=shared"], 3)
    m = method.model
    assert len(m.heads) == 1 and len(m.task_tokens) == 3
    head = m.heads[0]
    assert (head.fc.in_features, head.fc.out_features) == (3 * C, scenario[2].end)
    x = torch.randn(2, 1, 8, 8)
    patches = m.encoder(x)
    e = torch.cat([m.decoder(tok, patches)[:, 0] for tok in m.task_tokens], 1)  # [e_1, e_2, e_3], one token each
    torch.testing.assert_close(method.logits(x).double(), slow_head(e, head.norm, head.fc), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", ["shared", "expand"])
def test_shared_head_growth_keep_copies_the_old_weights(tokens):
    method, scenario = grown([f"method.task_tokens={tokens}", "method.heads=shared"], 1)
    m = method.model
    old = {k: v.clone() for k, v in m.heads[0].state_dict().items()}
    x = torch.randn(4, 1, 8, 8)
    before = method.logits(x).detach()
    method.begin_task(scenario[1])
    m.eval()
    new = m.heads[0]
    n_in, n_out = old["fc.weight"].shape[1], old["fc.weight"].shape[0]
    assert new.fc.in_features == (1 if tokens == "shared" else 2) * C and new.fc.out_features == scenario[1].end
    torch.testing.assert_close(new.fc.weight[:n_out, :n_in], old["fc.weight"])
    torch.testing.assert_close(new.fc.bias[:n_out], old["fc.bias"])
    torch.testing.assert_close(new.norm.weight[:n_in], old["norm.weight"])
    torch.testing.assert_close(new.norm.bias[:n_in], old["norm.bias"])
    if tokens == "shared":  # same input, same LayerNorm, same rows: the old classes' logits do not move
        torch.testing.assert_close(method.logits(x)[:, :n_out], before)
    # the teacher is the model before the growth
    torch.testing.assert_close(method.teacher(x), before)


def test_shared_head_growth_reset_starts_afresh():
    method, scenario = grown(["method.heads=shared", "method.shared_head_growth=reset"], 1)
    old = method.model.heads[0].fc.weight.detach().clone()
    torch.manual_seed(1)
    method.begin_task(scenario[1])
    new = method.model.heads[0].fc.weight[: old.shape[0], : old.shape[1]]
    assert not torch.allclose(new, old)
    torch.testing.assert_close(method.model.heads[0].norm.weight, torch.ones(2 * C))  # a fresh LayerNorm


@pytest.mark.parametrize("tokens,heads", [("shared", "shared"), ("expand", "shared"), ("shared", "independent")])
def test_parameter_counts(tokens, heads):
    method, scenario = make_method([f"method.task_tokens={tokens}", f"method.heads={heads}"])
    counts = []
    for t in scenario:
        method.begin_task(t)
        counts.append(method.count_parameters().total)
    m = method.model
    shared = n_params(m.encoder) + n_params(m.decoder)
    for i, total in enumerate(counts):
        n_tok, seen = (1 if tokens == "shared" else i + 1), scenario[i].end
        if heads == "shared":
            d = n_tok * C
            want = shared + n_tok * C + 2 * d + d * seen + seen
        else:
            want = shared + n_tok * C + sum(2 * C + C * scenario[j].num_classes + scenario[j].num_classes
                                            for j in range(i + 1))
        assert total == want, (i, total, want)


# --------------------------------------------------------------------------------------------- freezing, loss
def test_shared_parts_train_whole():
    method, scenario = make_method([*SHARED_BOTH, "method.divergence_weight=0"])
    method.begin_task(scenario[0])
    method.begin_task(scenario[1])
    m = method.model
    assert m.head_div is None
    train, ft = method.phases(scenario[1])
    method.setup_phase(train, scenario[1])
    assert all(p.requires_grad for p in m.parameters())  # nothing old to freeze: one token, one head
    method.setup_phase(ft, scenario[1])
    assert not any(p.requires_grad for p in m.encoder.parameters())
    assert m.task_tokens[0].requires_grad and all(p.requires_grad for p in m.heads.parameters())


@pytest.mark.parametrize("tokens", ["shared", "expand"])
def test_loss_with_a_shared_head_matches_transcription(tokens):
    method, scenario = make_method([f"method.task_tokens={tokens}", "method.heads=shared"])
    for t in range(3):
        method.begin_task(scenario[t])
    task = scenario[2]
    phase = method.phases(task)[0]
    method.setup_phase(phase, task)
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, task.end, (10,), generator=g)
    b = Batch(x=torch.randn(10, 1, 8, 8, generator=g), y=y, task=scenario.task_of_label[y], index=torch.arange(10))
    loss, logs = method.loss(b, phase, task)
    m = method.model
    logits, old = m(b.x), method.teacher(b.x)
    n_old, seen = task.offset, task.end
    lam = n_old / seen
    p_t = torch.softmax(old, 1)
    kd = (p_t * (torch.log(p_t) - torch.log_softmax(logits[:, :n_old], 1))).sum() / (10 * n_old)
    expected = (1 - lam) * F.binary_cross_entropy_with_logits(logits, torch.eye(seen)[y]) + lam * kd
    div_in = m.forward_features(b.x)[:, -1]  # the newest token (the only one when shared)
    div_t = torch.eye(task.num_classes + 1)[torch.where(y < n_old, 0, y - n_old + 1)]
    expected = expected + 0.1 * F.binary_cross_entropy_with_logits(m.head_div(div_in), div_t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(logs) == {"cls", "kd", "div"}


# --------------------------------------------------------------------------------------------- options
def test_options_are_validated():
    with pytest.raises(ConfigError, match="method.shared_head_growth"):
        load_config(["dytox/digits-b0inc2"], ["method.shared_head_growth=reset"])
    with pytest.raises(ConfigError, match="method.task_tokens"):
        load_config(["dytox/digits-b0inc2"], ["method.task_tokens=one"])
    with pytest.raises(ConfigError, match="method.heads"):
        load_config(["dytox/digits-b0inc2"], ["method.heads=joint"])
    with pytest.raises(ConfigError, match="lpa-baseline"):
        load_config(["lpa-baseline/digits-b0inc2"], ["method.task_tokens=expand"])
    cfg, _ = load_config(["dytox/digits-b0inc2"])
    assert (cfg.method.task_tokens, cfg.method.heads, cfg.method.shared_head_growth) == ("expand", "independent",
                                                                                         "keep")


# --------------------------------------------------------------------------------------------- presets
# row -> (task_tokens, heads, growth, distillation, finetune_epochs, divergence_weight)
ROWS = {
    "transformer": ("shared", "shared", "keep", False, 0, 0.0),
    "kd": ("shared", "shared", "keep", True, 0, 0.0),
    "finetune": ("shared", "shared", "keep", True, 20, 0.0),
    "tokens": ("expand", "shared", "reset", True, 20, 0.0),
    "divergence": ("expand", "shared", "reset", True, 20, 0.1),
}
SHARED_PART = 10_683_564  # patch and positional embedding, 5 GPSA SABs, 1 TAB (docs/methods/dytox.md)


@pytest.mark.parametrize("row", list(ROWS))
def test_ablation_preset_builds_and_counts(row, capsys):
    name = f"dytox/cifar100-b0inc2-ablation-{row}"
    cfg, _ = load_config([name])
    o = cfg.method
    assert (o.task_tokens, o.heads, o.shared_head_growth, o.distillation, o.finetune_epochs,
            o.divergence_weight) == ROWS[row]
    full, _ = load_config(["dytox/cifar100-b0inc2"])
    for section in ("model", "train", "memory"):  # everything else is the DyTox recipe
        assert vars(getattr(cfg, section)) == vars(getattr(full, section))
    assert cfg.data.increment == 2 and cfg.data.class_order == "cifar100-order1"
    # two tasks of 50 classes keep the count instant; 50 tasks of 2: docs/methods/dytox.md#model-ablation
    assert cli.main(["params", name, "data.increment=50", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    d = 384 * (1 if o.task_tokens == "shared" else 2)
    assert rows[-1]["total"] == SHARED_PART + d + 2 * d + d * 100 + 100


def test_ablation_model_builds_and_runs():
    """The full-size "Transformer" row: one token, one head over the seen classes (`vitcl params` above builds
    every row's model too)."""
    cfg, _ = load_config(["dytox/cifar100-b0inc2-ablation-transformer"])
    method = METHODS.get(cfg.method.name)(cfg, build_scenario(cfg.data, shapes_only=True), torch.device("cpu"))
    for _ in range(3):
        method.model.add_task(2)
    with torch.no_grad():
        logits = method.model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 6) and len(method.model.heads) == 1
    assert len(method.model.task_tokens) == 1


# --------------------------------------------------------------------------------------------- end to end
def test_tiny_run_shared_token_and_shared_head(tmp_path):
    args = ["dytox/digits-b0inc2", *TINY, *SHARED_BOTH, "data.increment=5", "data.train_per_class=16",
            "data.test_per_class=8", "train.epochs=1", "train.batch_size=32", "method.finetune_epochs=1",
            "run.progress=false", f"run.out_dir={tmp_path}", "run.name=abl"]
    assert cli.main(["run", "-q", *args]) == 0
    res = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert res["tasks_done"] == 2 and len(res["class_il"]["acc_matrix"]) == 2
    assert res["params"]["final"] == res["params"]["per_task"][0] + 5 * (C + 1)  # 5 more rows of the one head
    saved = yaml.safe_load((tmp_path / "abl" / "config.yaml").read_text())
    assert (saved["method"]["task_tokens"], saved["method"]["heads"]) == ("shared", "shared")
