"""qlora_linear on every backend against the fp64 reference, against PEFT + bitsandbytes, its
dropout mask across backends, its errors, and the memory it never takes (no dense weight)."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

import deltakern
from deltakern.nf4 import NF4Weight, bnb_linear4bit, quantize_nf4
from deltakern.reference.qlora_linear import qlora_linear as reference_qlora_linear
from tests.allocations import largest_allocation
from tests.tolerances import assert_backend_matches_reference

SEED = 4321
BACKENDS = ["reference", "cpu", "triton"]
# in = 100 and 1000 put blocks across rows; out = 1, 7, 129 give odd value counts; M = 1 decodes.
SHAPES = [(1, 100, 7, 4), (5, 1000, 1, 8), (3, 100, 129, 16), (64, 64, 64, 8)]


def make_inputs(m, k, n, r, blocksize=64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    dense = torch.randn(n, k, generator=g) / math.sqrt(k)
    return {
        "x": torch.randn(m, k, generator=g, dtype=d),
        "weight": quantize_nf4(dense, blocksize),
        "bias": torch.randn(n, generator=g, dtype=d) if bias else None,
        "lora_A": torch.randn(r, k, generator=g, dtype=d) / math.sqrt(k),
        "lora_B": torch.randn(n, r, generator=g, dtype=d) / math.sqrt(r),
        "grad_out": torch.randn(m, n, generator=g, dtype=d),
    }


def run(fn, inputs, dtype, scaling, dropout_p, grad_names=("x", "lora_A", "lora_B")):
    t = {k: (v if v is None or isinstance(v, NF4Weight) else v.detach().to(dtype, copy=True)) for k, v in inputs.items()}
    for name in grad_names:
        t[name].requires_grad_(True)
    out = fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], scaling, dropout_p, SEED)
    out.backward(t["grad_out"])
    return out.detach(), {name: t[name].grad for name in grad_names}


def shape_id(shape):
    return "M{}-in{}-out{}-r{}".format(*shape)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_reference(backend, shape, blocksize, dropout_p, poison_uninitialized):
    inputs = make_inputs(*shape, blocksize=blocksize, bias=blocksize != 128)
    assert_backend_matches_reference(backend, deltakern.qlora_linear, reference_qlora_linear, run, inputs,
                                     torch.float32, 0.75, dropout_p)


# M=130 >= 128 rows: on a CPU with AVX-512 BF16 the base GEMMs run in bf16 over several row tiles
# of Ŵ (forward) and column slabs (backward), K=520 not a whole number of blocks per row.
BF16_SHAPES = SHAPES + [(130, 520, 1100, 8)]


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("shape", BF16_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bf16_matches_reference(backend, shape, dropout_p, poison_uninitialized):
    assert_backend_matches_reference(backend, deltakern.qlora_linear, reference_qlora_linear, run,
                                     make_inputs(*shape), torch.bfloat16, 0.75, dropout_p)


def test_bias_gets_its_gradient_when_it_requires_one():
    inputs = make_inputs(5, 100, 7, 4)
    bias = inputs["bias"].float().requires_grad_(True)
    grad_out = inputs["grad_out"].float()
    with deltakern.use_backend("cpu"):
        y = deltakern.qlora_linear(inputs["x"].float(), inputs["weight"], bias, inputs["lora_A"].float(),
                                   inputs["lora_B"].float(), 0.5)
    y.backward(grad_out)
    torch.testing.assert_close(bias.grad, grad_out.sum(0))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout_mask_is_the_reference_mask(backend):
    """Same seed, same mask on every backend: outputs and gradients agree with the reference,
    whose mask is lora_linear's Philox mask."""
    inputs = make_inputs(9, 100, 7, 4)
    with deltakern.use_backend(backend):
        out, grads = run(deltakern.qlora_linear, inputs, torch.float32, 2.0, 0.5)
    with deltakern.use_backend("reference"):
        ref, ref_grads = run(deltakern.qlora_linear, inputs, torch.float32, 2.0, 0.5)
        no_dropout, _ = run(deltakern.qlora_linear, inputs, torch.float32, 2.0, 0.0)
    assert (ref - no_dropout).abs().max() > 0.1  # the mask matters at this p
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5)


def test_m_zero_rows():
    inputs = make_inputs(1, 100, 7, 4)
    x = torch.zeros(2, 0, 100)
    for backend in ("reference", "cpu"):
        with deltakern.use_backend(backend):
            y = deltakern.qlora_linear(x, inputs["weight"], None, inputs["lora_A"].float(), inputs["lora_B"].float(), 1.0)
        assert y.shape == (2, 0, 7)


# ------------------------------------------------------------------------------------------------
# Against PEFT's LoRA over bitsandbytes' Linear4bit (the real thing)
# ------------------------------------------------------------------------------------------------

bnb = pytest.importorskip("bitsandbytes")


class _OneLayer(torch.nn.Module):
    def __init__(self, layer, loaded_in_4bit):
        super().__init__()
        self.proj = layer
        # What transformers sets on a model loaded with load_in_4bit: PEFT then wraps the layer in
        # its bitsandbytes LoRA class (peft.tuners.lora.bnb.Linear4bit), else in lora.Linear.
        self.is_loaded_in_4bit = loaded_in_4bit

    def forward(self, x):
        return self.proj(x)


def peft_qlora(k, n, r, dtype, loaded_in_4bit, seed=0):
    """A PEFT LoRA model over one bitsandbytes NF4 Linear4bit, LoRA B drawn (not PEFT's zeros)."""
    import peft

    torch.manual_seed(seed)
    dense = torch.nn.Linear(k, n).to(dtype)
    model = _OneLayer(bnb_linear4bit(dense, dtype, compress_statistics=True), loaded_in_4bit)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    with torch.no_grad():
        model.base_model.model.proj.lora_B["default"].weight.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("loaded_in_4bit", [True, False], ids=["peft-bnb-layer", "peft-linear-layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_patched_peft_qlora_layer_matches_peft(backend, dtype, loaded_in_4bit):
    k, n, r = 100, 129, 8
    model = peft_qlora(k, n, r, dtype, loaded_in_4bit)
    layer = model.base_model.model.proj
    x = torch.randn(2, 5, k, dtype=dtype)
    grad_out = torch.randn(2, 5, n, dtype=dtype)

    def step():
        xi = x.clone().requires_grad_(True)
        model.zero_grad()
        y = model(xi)
        y.backward(grad_out)
        return y.detach(), xi.grad, layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone()

    theirs = step()
    report = deltakern.patch(model)
    assert report.patched == ["proj"] and report.skipped == []
    with deltakern.use_backend(backend):
        ours = step()
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (3e-2, 3e-2)
    for name, a, b in zip(("out", "dx", "dA", "dB"), ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), atol=atol * max(1.0, b.abs().max().item()), rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_op_reads_a_params4bit_directly():
    model = peft_qlora(100, 7, 4, torch.float32, True)
    base = model.base_model.model.proj.base_layer
    x = torch.randn(3, 100)
    a, b = torch.randn(4, 100), torch.randn(7, 4)
    ours = deltakern.qlora_linear(x, base.weight, base.bias, a, b, 0.5)
    torch.testing.assert_close(ours, base(x) + 0.5 * x @ a.t() @ b.t(), atol=1e-5, rtol=1e-5)


def test_patch_reads_a_weight_bitsandbytes_repacked_for_its_cpu_kernel():
    """bitsandbytes' eval forward on an AVX512-BF16 CPU repacks a Linear4bit's weight for its own
    kernel (absmax to bf16). Done here with its converter on any CPU: the patched layer computes
    with what bitsandbytes would save (its own inverse, which state_dict() runs), and the op
    refuses the repacked layout instead of reading it as NF4."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = peft_qlora(128, 64, 4, torch.float32, True)
    base = model.base_model.model.proj.base_layer
    base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu(base.weight.data, base.weight.quant_state)
    with pytest.raises(ValueError, match=r"AVX512-BF16 CPU inference layout \(quant_state.packing_format_for_cpu\)"):
        deltakern.qlora_linear(torch.randn(3, 128), base.weight, None, torch.randn(4, 128), torch.randn(64, 4), 0.5)
    expected_model = copy.deepcopy(model)
    expected_model.base_model.model.proj.base_layer.state_dict()  # bitsandbytes restores the NF4 format
    x = torch.randn(3, 128)
    expected = expected_model(x)
    assert deltakern.patch(model).patched == ["proj"]
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert not base.weight.quant_state.packing_format_for_cpu


def test_unquantised_or_fp4_bases_stay_on_peft_path():
    import peft

    layer = bnb.nn.Linear4bit(100, 7, quant_type="fp4").to("cpu")
    model = peft.get_peft_model(_OneLayer(layer, True), peft.LoraConfig(r=4, target_modules=["proj"]))
    report = deltakern.patch(model)
    assert report.patched == [] and report.skipped == [("proj", "4-bit base not in NF4 (FP4, or not quantised yet)")]


# ------------------------------------------------------------------------------------------------
# Errors and memory
# ------------------------------------------------------------------------------------------------


def _args():
    i = make_inputs(3, 100, 7, 4)
    return [i["x"].float(), i["weight"], i["bias"].float(), i["lora_A"].float(), i["lora_B"].float()]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__(1, torch.zeros(7, 100)), "weight must be an NF4 weight (deltakern.nf4.NF4Weight or a bitsandbytes Params4bit), got a dense torch.float32 tensor"),
        (lambda a: a.__setitem__(1, bnb.nn.Params4bit(torch.zeros(7, 100), quant_type="nf4")), "expected a quantised bitsandbytes Params4bit with a quant_state"),
        (lambda a: a.__setitem__(0, a[0][:, :99]), "x has 99 input features, weight [out, in] expects in=100"),
        (lambda a: a.__setitem__(3, a[3][:, :99]), "lora_A must be [r, in=100], got (4, 99)"),
        (lambda a: a.__setitem__(4, a[4][:6]), "lora_B must be [out=7, r=4], got (6, 4)"),
        (lambda a: a.__setitem__(2, a[2][:6]), "bias must be [out=7], got (6,)"),
        (lambda a: a.__setitem__(3, a[3].double()), "lora_A has dtype torch.float64, expected torch.float32 like x"),
        (lambda a: a.__setitem__(1, a[1].to("meta")), "the NF4 weight is on meta, expected cpu like x"),
    ],
    ids=["dense-weight", "no-quant-state", "in-x", "in-A", "out-B", "out-bias", "dtype-A", "device-W"],
)
def test_bad_inputs_name_the_argument(mutate, message):
    a = _args()
    mutate(a)
    with pytest.raises(ValueError, match=re.escape(message)):
        deltakern.qlora_linear(*a, 1.0)


def test_blocksize_mismatch_is_named():
    q = quantize_nf4(torch.randn(7, 100), 64)
    with pytest.raises(ValueError, match=re.escape("blocksize mismatch")):
        NF4Weight(q.packed, q.absmax, q.shape, blocksize=32)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cpu_step_never_allocates_the_dense_weight(dropout_p):
    """Forward and backward on the cpu backend allocate nothing near the dense [out, in] weight
    (4 MiB here): only activations (x, dx: 256 KiB) and bounded tile buffers."""
    m, k, n, r = 64, 1024, 1024, 16
    inputs = make_inputs(m, k, n, r)
    dense_bytes = n * k * 4

    def step():
        with deltakern.use_backend("cpu"):
            run(deltakern.qlora_linear, inputs, torch.float32, 1.0, dropout_p)

    step()  # warm-up: one-time allocations (thread pools, oneDNN kernels) out of the way
    largest = largest_allocation(step)
    assert largest <= dense_bytes // 4, f"largest allocation {largest} B against a {dense_bytes} B dense weight"
    with deltakern.use_backend("reference"):  # the check sees a dense weight where there is one
        assert largest_allocation(lambda: run(deltakern.qlora_linear, inputs, torch.float32, 1.0, 0.0)) >= dense_bytes
