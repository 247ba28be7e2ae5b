"""MultiLoRALinear (named LoRA adapters in one layer) against the LoRA formula written out in fp64,
per sequence (mixed batches), for the active set, and against LoRALinear."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from deltakern.nn import LoRALinear, MultiLoRALinear, NF4Linear
from deltakern.ops.lora_linear import lora_linear

IN, OUT = 13, 7
# name: (r, alpha, use_rslora); ranks 1, 8 and 16 mixed
ADAPTERS = {"a": (1, 4.0, False), "b": (8, 16.0, True), "c": (16, 8.0, False)}


def make_layer(kind="linear", adapters=ADAPTERS, dropout_p=0.0, seed=0):
    torch.manual_seed(seed)
    if kind == "conv1d":
        base = Conv1D(OUT, IN).double()
        torch.nn.init.normal_(base.weight)
        torch.nn.init.normal_(base.bias)
    else:
        base = torch.nn.Linear(IN, OUT).double()
    base.requires_grad_(False)
    layer = MultiLoRALinear(base)
    for name, (r, alpha, rslora) in adapters.items():
        layer.add_adapter(name, r, alpha, dropout_p, rslora)
    with torch.no_grad():  # B starts at zero: draw it so every adapter shows
        for name in adapters:
            layer.lora_B[name].normal_()
    return layer


def dense(layer):
    w = layer.base_layer.weight
    return w.t() if layer.fan_in_fan_out else w


def expected(layer, x, names):
    """Per sequence b: base(x_b) + s (x_b Aᵀ) Bᵀ of adapter names[b], written out."""
    base = x @ dense(layer).t() + layer.base_layer.bias
    rows = []
    for b, name in enumerate(names):
        y = base[b]
        if name != "__base__":
            y = y + layer.scaling[name] * (x[b] @ layer.lora_A[name].t()) @ layer.lora_B[name].t()
        rows.append(y)
    return torch.stack(rows)


def grads(layer, out, weights, *extra):
    params = [p for n in layer.adapter_names for p in (layer.lora_A[n], layer.lora_B[n])]
    return torch.autograd.grad((out * weights).sum(), params + list(extra), allow_unused=True)


def test_scaling_and_initialisation():
    layer = MultiLoRALinear(torch.nn.Linear(IN, OUT))
    layer.add_adapter("a", 4, 8.0)
    layer.add_adapter("b", 16, 8.0, use_rslora=True)
    assert layer.scaling == {"a": 2.0, "b": 2.0}
    assert torch.count_nonzero(layer.lora_B["a"]) == 0 and torch.count_nonzero(layer.lora_A["a"]) > 0
    assert [n for n, _ in layer.named_parameters() if "lora" in n] == ["lora_A.a", "lora_A.b", "lora_B.a", "lora_B.b"]
    assert layer.routing.active == ("a",)  # the first adapter is active, as in PEFT


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_mixed_batch_output_and_gradients_match_the_formula(kind):
    layer = make_layer(kind)
    names = ["b", "__base__", "a", "c", "b"]
    x = torch.randn(5, 6, IN, dtype=torch.float64, requires_grad=True)
    out = layer(x, adapter_names=names)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = expected(layer, ref_x, names)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    weights = torch.randn_like(ref)
    # every adapter's dA, dB and dx
    for got, want in zip(grads(layer, out, weights, x), grads(layer, ref, weights, ref_x)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    assert layer.routing.batch is None  # the layer's own routing ends with the call


def test_adapter_without_rows_gets_zero_gradients_and_base_rows_get_base_only():
    layer = make_layer()
    x = torch.randn(3, 4, IN, dtype=torch.float64)
    out = layer(x, adapter_names=["a", "__base__", "a"])
    torch.testing.assert_close(out[1], layer.base_layer(x[1]), atol=1e-12, rtol=0)
    da_a, da_b, db_a, db_b, dc_a, dc_b = grads(layer, out, torch.randn_like(out))
    for g in (db_a, db_b, dc_a, dc_b):  # b and c have no rows: zeros, not None, not NaN
        assert g is not None and not torch.isnan(g).any() and torch.count_nonzero(g) == 0
    assert torch.count_nonzero(da_a) > 0 and torch.count_nonzero(da_b) > 0


def test_one_active_adapter_equals_lora_linear():
    layer = make_layer()
    layer.set_adapter("b")
    single = LoRALinear(layer.base_layer, 8, 16.0, use_rslora=True).double()
    with torch.no_grad():
        single.lora_A.copy_(layer.lora_A["b"])
        single.lora_B.copy_(layer.lora_B["b"])
    x = torch.randn(2, 5, IN, dtype=torch.float64)
    torch.testing.assert_close(layer(x), single(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-no-dropout"])
def test_several_active_adapters_are_summed(training):
    layer = make_layer(dropout_p=0.0)
    layer.train(training)
    layer.set_adapter(["a", "c"])
    x = torch.randn(3, 4, IN, dtype=torch.float64)
    out = layer(x)
    ref = (x @ layer.base_layer.weight.t() + layer.base_layer.bias
           + layer.scaling["a"] * (x @ layer.lora_A["a"].t()) @ layer.lora_B["a"].t()
           + layer.scaling["c"] * (x @ layer.lora_A["c"].t()) @ layer.lora_B["c"].t())
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    weights = torch.randn_like(ref)
    got, want = grads(layer, out, weights), grads(layer, ref, weights)
    assert got[2] is None and got[3] is None  # b is inactive: not in the computation
    for g, w in zip(got[:2] + got[4:], want[:2] + want[4:]):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-9)


def test_several_active_adapters_with_dropout_draw_one_mask_each():
    """With dropout, the first adapter runs in lora_linear (seed from torch's generator) and each
    other draws its own nn.functional.dropout mask: replayed here from the same generator state."""
    layer = make_layer(dropout_p=0.5)
    layer.train()
    layer.set_adapter(["c", "a"])
    x = torch.randn(3, 4, IN, dtype=torch.float64)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    ref = lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["c"], layer.lora_B["c"],
                      layer.scaling["c"], 0.5)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    ref = ref + layer.scaling["a"] * (dropped @ layer.lora_A["a"].t()) @ layer.lora_B["a"].t()
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    layer.eval()
    no_dropout = layer(x)
    assert not torch.allclose(out, no_dropout)


def test_a_layer_lacking_an_adapter_runs_its_base_for_it():
    layer = make_layer(adapters={"a": (2, 2.0, False)})
    layer.routing.register("z")  # an adapter of the model that does not target this layer
    x = torch.randn(2, 3, IN, dtype=torch.float64)
    out = layer(x, adapter_names=["z", "a"])
    torch.testing.assert_close(out[0], layer.base_layer(x[0]), atol=1e-12, rtol=0)
    torch.testing.assert_close(out, expected(layer, x, ["__base__", "a"]), atol=1e-10, rtol=1e-9)
    layer.set_adapter("z")
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)


def test_from_lora_linear_keeps_the_parameter_objects():
    single = LoRALinear(torch.nn.Linear(IN, OUT), 4, 8.0, dropout_p=0.1)
    multi = MultiLoRALinear.from_lora_linear(single, "default", MultiLoRALinear(torch.nn.Linear(1, 1)).routing)
    assert multi.lora_A["default"] is single.lora_A and multi.lora_B["default"] is single.lora_B
    assert (multi.r["default"], multi.scaling["default"], multi.dropout_p["default"]) == (4, 2.0, 0.1)
    dora = LoRALinear(torch.nn.Linear(IN, OUT), 4, 8.0, use_dora=True)
    with pytest.raises(NotImplementedError, match="DoRA"):
        MultiLoRALinear.from_lora_linear(dora, "default", multi.routing)


def test_bad_names_and_batches_are_refused():
    layer = make_layer()
    for bad in ("__base__", "a.b", "", 3):
        with pytest.raises(ValueError, match="adapter name must be"):
            layer.add_adapter(bad, 2, 2.0)
    with pytest.raises(ValueError, match="already has an adapter 'a'"):
        layer.add_adapter("a", 2, 2.0)
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) 'nope'; the model's adapters are 'a', 'b', 'c'"):
        layer.set_adapter(["a", "nope"])
    x = torch.randn(2, 3, IN, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) 'x'.*'__base__'"):
        layer(x, adapter_names=["a", "x"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries, the layer's input has a batch dimension of 2"):
        layer(x, adapter_names=["a", "b", "c"])
    assert layer.routing.batch is None  # an error leaves no routing behind
    with pytest.raises(ValueError, match="base must be an nn.Linear"):
        MultiLoRALinear(NF4Linear.from_linear(torch.nn.Linear(64, 8), 64))
