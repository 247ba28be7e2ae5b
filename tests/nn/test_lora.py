"""LoRALinear (and its DoRA mode) against PEFT's lora.Linear with the same weights."""

import math

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from transformers.pytorch_utils import Conv1D

from deltakern.nf4 import quantize_nf4
from deltakern.nn import LoRALinear, NF4Linear
from deltakern.reference.dora_linear import dora_linear as dora_reference
from tests.patch.test_dora import PhiloxDropout


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
    [({"r": 0}, "r must be an int >= 1"), ({"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)"),
     ({"use_dora": "yes"}, "use_dora must be a bool, got 'yes'"), ({"use_dora": None}, "use_dora must be a bool")],
)
def test_bad_arguments(kwargs, message):
    args = {"r": 4, "alpha": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        LoRALinear(torch.nn.Linear(4, 4), **args)
    with pytest.raises(ValueError, match="base must be an nn.Linear"):
        LoRALinear(torch.nn.Conv1d(4, 4, 1), r=4, alpha=8)


# ---------------------------------------------------------------------------------------------
# DoRA (use_dora=True) against PEFT's lora.Linear with use_dora=True
# ---------------------------------------------------------------------------------------------


def make_dora_pair(kind, use_rslora=False, dropout_p=0.0, in_f=24, out_f=10, r=4, alpha=16):
    """A DoRA LoRALinear and PEFT's DoRA lora.Linear over copies of one base (``kind``: "linear",
    "nobias" or "conv1d"), with the same random A, B and magnitudes (B ≠ 0, m ≠ ‖W‖)."""
    torch.manual_seed(0)
    if kind == "conv1d":
        base = Conv1D(out_f, in_f)  # weight [in, out]
        torch.nn.init.normal_(base.bias)
    else:
        base = torch.nn.Linear(in_f, out_f, bias=kind != "nobias")
    base.requires_grad_(False)
    peft_base = Conv1D(out_f, in_f) if kind == "conv1d" else torch.nn.Linear(in_f, out_f, bias=kind != "nobias")
    peft_base.load_state_dict(base.state_dict())
    peft_base.requires_grad_(False)
    ours = LoRALinear(base, r=r, alpha=alpha, dropout_p=dropout_p, use_rslora=use_rslora, use_dora=True)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout_p, use_rslora=use_rslora, use_dora=True,
                        fan_in_fan_out=kind == "conv1d")
    theirs = PeftLoraLinear(peft_base, "default", config, r=r, lora_alpha=alpha)
    torch.testing.assert_close(ours.lora_magnitude, theirs.lora_magnitude_vector["default"].weight, atol=0, rtol=0)
    with torch.no_grad():
        ours.lora_A.normal_()
        ours.lora_B.normal_()
        ours.lora_magnitude.mul_(torch.rand(out_f) + 0.5)
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude)
    return ours, theirs


def forward_backward_both(ours, theirs, x, seed=5):
    """Outputs and (dx, dA, dB, dm) of both modules on copies of x, each after torch.manual_seed(seed)."""
    results = []
    g = torch.randn(*x.shape[:-1], ours.out_features, generator=torch.Generator().manual_seed(9))
    for module in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(seed)
        y = module(xi)
        y.backward(g)
        if module is ours:
            params = (ours.lora_A, ours.lora_B, ours.lora_magnitude)
        else:
            params = (theirs.lora_A["default"].weight, theirs.lora_B["default"].weight,
                      theirs.lora_magnitude_vector["default"].weight)
        results.append((y.detach(), [xi.grad] + [p.grad for p in params]))
    return results


@pytest.mark.parametrize("kind, use_rslora", [("linear", False), ("nobias", False), ("conv1d", False),
                                              ("linear", True)], ids=["linear", "nobias", "conv1d", "rslora"])
def test_dora_same_output_and_gradients_as_peft(kind, use_rslora):
    ours, theirs = make_dora_pair(kind, use_rslora)
    assert ours.scaling == pytest.approx(theirs.scaling["default"])
    (y1, g1), (y2, g2) = forward_backward_both(ours, theirs, torch.randn(3, 5, 24))
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    for name, mine, their in zip(("x", "lora_A", "lora_B", "magnitude"), g1, g2):
        assert mine.abs().max() > 0, name
        torch.testing.assert_close(mine, their, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_dropout_matches_peft_on_the_same_mask(kind):
    """Training mode with p = 0.3: PEFT's dropout branch (magnitude correction on the dropped
    input) on deltakern's Philox mask gives deltakern's output and gradients; eval mode has no
    dropout."""
    ours, theirs = make_dora_pair(kind, dropout_p=0.3)
    theirs.lora_dropout["default"] = PhiloxDropout(0.3)
    x = torch.randn(4, 3, 24)
    (y1, g1), (y2, g2) = forward_backward_both(ours.train(), theirs.train(), x)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    for name, mine, their in zip(("x", "lora_A", "lora_B", "magnitude"), g1, g2):
        torch.testing.assert_close(mine, their, atol=1e-5, rtol=1e-5, msg=name)
    (e1, _), (e2, _) = forward_backward_both(ours.eval(), theirs.eval(), x)
    torch.testing.assert_close(e1, e2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y1, e1, atol=1e-3)


def test_dora_initialisation_and_parameters():
    """The magnitude starts at ‖W‖ per row (PEFT's ‖W + s·B A‖ with B = 0), so the module equals
    its base; it follows lora_A's dtype and device, is a delta parameter, and shows in repr."""
    base = torch.nn.Linear(40, 12).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8, use_dora=True)
    assert layer.lora_magnitude.dtype == layer.lora_A.dtype == torch.bfloat16
    assert layer.lora_magnitude.device == layer.lora_A.device and layer.lora_magnitude.shape == (12,)
    torch.testing.assert_close(layer.lora_magnitude.float(), base.weight.float().norm(dim=1), atol=0, rtol=2**-8)
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x).float(), base(x).float(), atol=2e-2, rtol=2e-2)
    assert list(layer.delta_parameters()) == [layer.lora_A, layer.lora_B, layer.lora_magnitude]
    assert "use_dora=True" in repr(layer)
    plain = LoRALinear(torch.nn.Linear(40, 12), r=4, alpha=8)
    assert plain.lora_magnitude is None and len(list(plain.delta_parameters())) == 2
    assert "use_dora=False" in repr(plain)


def test_dora_over_nf4_dequantises_and_merges():
    """QDoRA: the forward is DoRA on the dequantised NF4 weight; merged_base folds
    (m / ‖Ŵ + s·B A‖) ⊙ (Ŵ + s·B A) and quantises the result to NF4 again."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 16)
    layer = LoRALinear(NF4Linear.from_linear(dense), r=4, alpha=8, use_dora=True)
    w_hat = layer.base_layer.dequantized(torch.float32)
    torch.testing.assert_close(layer.lora_magnitude, w_hat.norm(dim=1), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(torch.rand(16) + 0.5)
    x = torch.randn(5, 64)
    args = (layer.lora_A.double(), layer.lora_B.double(), layer.lora_magnitude.double(), layer.scaling)
    expected = dora_reference(x.double(), w_hat.double(), dense.bias.double(), *args)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        folded = w_hat + layer.scaling * layer.lora_B @ layer.lora_A
        folded = folded * (layer.lora_magnitude / folded.norm(dim=1)).unsqueeze(1)
    merged = layer.merged_base()
    assert isinstance(merged, NF4Linear)
    torch.testing.assert_close(merged.dequantized(torch.float32), quantize_nf4(folded).dequantize(torch.float32),
                               atol=1e-6, rtol=0)
