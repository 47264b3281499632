"""The optimiser's update kernel chosen per device: foreach on CPU, fused on CUDA; the update is unchanged."""
import pytest
import torch

from vitcl.config import OptimConfig
from vitcl.engine.optim import build_optimizer, use_fused


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_cpu_optimisers_use_foreach_and_update_as_the_plain_loop(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    optim = OptimConfig(optimizer=name, lr=0.1, weight_decay=0.01)
    fast = build_optimizer(list(model.named_parameters()), optim)
    assert all(g["foreach"] is True for g in fast.param_groups)
    assert not any(g.get("fused") for g in fast.param_groups)
    plain = build_optimizer(list(twin.named_parameters()), optim)
    for group in plain.param_groups:  # the per-parameter loop, as the reference for the foreach update
        group["foreach"] = False
    x = torch.randn(8, 4)
    for net, opt in ((model, fast), (twin, plain)):
        for _ in range(3):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


def test_use_fused_picks_fused_only_for_floating_cuda_parameters():
    assert not use_fused([torch.nn.Parameter(torch.zeros(2))])
    assert not use_fused([])
    if torch.cuda.is_available():
        assert use_fused([torch.nn.Parameter(torch.zeros(2, device="cuda"))])
