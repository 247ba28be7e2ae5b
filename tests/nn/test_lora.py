"""LoRALinear against PEFT's lora.Linear with the same weights."""

import math

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from deltakern.nn import LoRALinear


def make_pair(in_f, out_f, r, alpha, use_rslora, bias=True):
    torch.manual_seed(0)
    base = torch.nn.Linear(in_f, out_f, bias=bias)
    base.requires_grad_(False)
    peft_base = torch.nn.Linear(in_f, out_f, bias=bias)
    peft_base.load_state_dict(base.state_dict())
    peft_base.requires_grad_(False)
    ours = LoRALinear(base, r=r, alpha=alpha, use_rslora=use_rslora)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=use_rslora)
    theirs = PeftLoraLinear(peft_base, "default", config, r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=use_rslora)
    # PEFT starts with B = 0 like us; give both the same non-zero weights so the branch counts.
    with torch.no_grad():
        ours.lora_A.normal_()
        ours.lora_B.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    return ours, theirs


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_same_output_and_gradients_as_peft(use_rslora, bias):
    ours, theirs = make_pair(24, 10, 4, 16, use_rslora, bias)
    assert ours.scaling == pytest.approx(theirs.scaling["default"])
    x = torch.randn(3, 5, 24)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-5)


def test_initialisation_matches_peft():
    """B starts at zero (the module equals its base) and A is kaiming-uniform with a = sqrt(5)."""
    base = torch.nn.Linear(400, 30)
    layer = LoRALinear(base, r=64, alpha=32)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1.0 / math.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) on fan_in 400
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.95 * bound
    x = torch.randn(2, 400)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.scaling == 0.5
    assert LoRALinear(base, r=16, alpha=32, use_rslora=True).scaling == 8.0


def test_dropout_only_in_training():
    layer = LoRALinear(torch.nn.Linear(32, 8), r=4, alpha=8, dropout_p=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(a, layer(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"r": 0}, "r must be an int >= 1"), ({"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)")],
)
def test_bad_arguments(kwargs, message):
    args = {"r": 4, "alpha": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        LoRALinear(torch.nn.Linear(4, 4), **args)
    with pytest.raises(ValueError, match="base must be an nn.Linear"):
        LoRALinear(torch.nn.Conv1d(4, 4, 1), r=4, alpha=8)
