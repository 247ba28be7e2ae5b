"""deltakern.nn.Adapter: initialisation, the module's math, errors."""

import pytest
import torch

import deltakern
from deltakern.nn import Adapter
from deltakern.reference.adapter import adapter as reference_adapter


def test_lora_init_returns_the_residual_exactly():
    torch.manual_seed(0)
    module = Adapter(24, 4, activation="gelu", init="lora")
    h, residual = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    assert torch.equal(module.up.weight, torch.zeros(24, 4))
    assert module.down.weight.abs().sum() > 0
    assert torch.equal(module(h), h)
    assert torch.equal(module(h, residual), residual)


def test_houlsby_init_is_near_identity():
    torch.manual_seed(0)
    module = Adapter(64, 8, init="houlsby")
    assert torch.equal(module.down.bias, torch.zeros(8)) and torch.equal(module.up.bias, torch.zeros(64))
    assert 0.005 < module.down.weight.std().item() < 0.015 and 0.005 < module.up.weight.std().item() < 0.015
    h = torch.randn(16, 64)
    delta = (module(h) - h).abs().max().item()
    assert 0 < delta < 1e-2  # weights of std 1e-2: the adapter adds O(1e-3)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_forward_and_gradients_match_the_reference(backend):
    torch.manual_seed(0)
    module = Adapter(13, 3, activation="tanh", scaling=0.5).double()
    with torch.no_grad():
        module.up.weight.normal_()
        module.up.bias.normal_()
    h = torch.randn(4, 13, dtype=torch.float64, requires_grad=True)
    with deltakern.use_backend(backend):
        out = module(h)
    out.square().sum().backward()
    params = [h, module.down.weight, module.down.bias, module.up.weight, module.up.bias]
    grads = [p.grad.clone() for p in params]
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    ref = reference_adapter(*leaves, activation="tanh", scaling=0.5)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for g, leaf in zip(grads, leaves):
        torch.testing.assert_close(g, leaf.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_model": 0}, "d_model must be an int >= 1, got 0"),
        ({"bottleneck": 2.5}, "bottleneck must be an int >= 1, got 2.5"),
        ({"activation": "swish"}, "unknown activation 'swish'"),
        ({"init": "xavier"}, "unknown init 'xavier'; expected one of houlsby, lora"),
        ({"scaling": float("nan")}, "scaling must be a finite number, got nan"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"d_model": 8, "bottleneck": 2, **kwargs}
    with pytest.raises(ValueError, match=r"deltakern\.nn\.Adapter: " + message.replace("(", r"\(").replace(")", r"\)")):
        Adapter(**args)
