"""The C++ CPU kernels of qlora_linear (csrc/cpu/qlora_linear.cpp), called as torch.ops.deltakern.*:
nf4_dequantize bit for bit against deltakern.nf4.dequantize_nf4; forward and backward against
lora_linear's own CPU op on the dequantised weight (same dropout mask, so equal to rounding) and
against the fp64 reference with the tolerances of tests/tolerances.py. Shapes cover the three CPU
paths (at most 16 rows in fp32 / bf16: the fused small-M kernels; fewer than 128: per-task tiles;
more: shared tiles), weights of several tiles in each direction (N > 256 rows, K > 1024 columns),
odd N * K, blocks that span rows, and M = 1."""

import math

import pytest
import torch

import deltakern._C  # noqa: F401  (registers torch.ops.deltakern)
from deltakern.nf4 import NF4_CODE, dequantize_nf4, quantize_nf4
from deltakern.reference.qlora_linear import qlora_linear as reference_qlora_linear
from tests.tolerances import assert_close

ops = torch.ops.deltakern
SEED = 1234
SCALING = 0.75


def quantized(n, k, blocksize, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_nf4(torch.randn(n, k, generator=g) / math.sqrt(k), blocksize)


def make_inputs(m, k, n, r, seed=1):
    """fp64 x, bias, lora_A, lora_B and grad_out (outputs O(1))."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    return {
        "x": torch.randn(m, k, generator=g, dtype=d),
        "bias": torch.randn(n, generator=g, dtype=d),
        "lora_A": torch.randn(r, k, generator=g, dtype=d) / math.sqrt(k),
        "lora_B": torch.randn(n, r, generator=g, dtype=d) / math.sqrt(r),
        "grad_out": torch.randn(m, n, generator=g, dtype=d),
    }


def run_ops(w, t, bias, dropout_p):
    """(out, xa, dx, dA, dB) of the qlora ops on the tensors t (one dtype)."""
    seed = torch.tensor([SEED])
    n = w.shape[0]
    out, xa = ops.qlora_linear_fwd(t["x"], w.packed, w.absmax, NF4_CODE, w.blocksize, n, t["bias"] if bias else None,
                                   t["lora_A"], t["lora_B"], SCALING, dropout_p, seed)
    dx, da, db = ops.qlora_linear_bwd(t["grad_out"], t["x"], w.packed, w.absmax, NF4_CODE, w.blocksize, t["lora_A"],
                                      t["lora_B"], xa, SCALING, dropout_p, seed)
    return out, xa, dx, da, db


def run_reference(w, inputs, dtype, bias, dropout_p):
    """Output and (dx, dA, dB) of the reference in dtype, by autograd."""
    t = {k: v.detach().to(dtype).requires_grad_(k in ("x", "lora_A", "lora_B")) for k, v in inputs.items()}
    out = reference_qlora_linear(t["x"], w, t["bias"] if bias else None, t["lora_A"], t["lora_B"], SCALING,
                                 dropout_p, SEED)
    out.backward(t["grad_out"])
    return out.detach(), (t["x"].grad, t["lora_A"].grad, t["lora_B"].grad)


BLOCKSIZES = (32, 64, 128, 256)
DEQUANT_SHAPES = [(1, 100), (7, 1000), (129, 100), (7, 7), (129, 33), (1, 1), (3, 1025)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", DEQUANT_SHAPES, ids=str)
def test_nf4_dequantize_is_bit_identical(shape, blocksize, dtype, poison_uninitialized):
    n, k = shape
    w = quantized(n, k, blocksize)
    got = ops.nf4_dequantize(w.packed, w.absmax, NF4_CODE, blocksize, n, k, dtype)
    assert got.dtype == dtype and got.shape == (n, k)
    assert torch.equal(got, dequantize_nf4(w.packed, w.absmax, blocksize, (n, k), dtype))


def test_nf4_dequantize_rounds_ties_to_even():
    """absmax chosen so code * absmax lands on bf16 and fp16 rounding ties and near-ties."""
    absmax = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 3.0 - 2.0**-9], dtype=torch.float32)
    packed = torch.arange(128, dtype=torch.int64).mul(37).remainder(256).to(torch.uint8)
    for dtype in (torch.bfloat16, torch.float16):
        got = ops.nf4_dequantize(packed, absmax, NF4_CODE, 64, 4, 64, dtype)
        assert torch.equal(got, dequantize_nf4(packed, absmax, 64, (4, 64), dtype))


# (M, K, N, r): M = 1, the per-task path (M < 128) and the shared-tile path; N * K odd; K > 1024
# (two reduction chunks) and N > 256 (two row tiles of the shared path).
SHAPES = [(1, 100, 7, 4), (7, 1000, 129, 8), (37, 33, 65, 16), (130, 1100, 300, 8), (200, 96, 13, 1)]


def shape_id(shape):
    return "M{}-in{}-out{}-r{}".format(*shape)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fp32_matches_lora_linear_on_the_dequantised_weight(shape, bias, dropout_p, poison_uninitialized):
    """Same mask and math as lora_linear's CPU op on the dense weight: equal to fp32 rounding."""
    m, k, n, r = shape
    w = quantized(n, k, 64)
    t = {key: v.float() for key, v in make_inputs(m, k, n, r).items()}
    ours = run_ops(w, t, bias, dropout_p)
    dense = w.dequantize(torch.float32)
    seed = torch.tensor([SEED])
    out, xa = ops.lora_linear_fwd(t["x"], dense, t["bias"] if bias else None, t["lora_A"], t["lora_B"], SCALING,
                                  dropout_p, seed)
    grads = ops.lora_linear_bwd(t["grad_out"], t["x"], dense, t["lora_A"], t["lora_B"], xa, SCALING, dropout_p, seed)
    for name, got, want in zip(("out", "xa", "dx", "dA", "dB"), ours, (out, xa, *grads)):
        assert not torch.isnan(got).any(), name
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, atol=2e-6 * scale, rtol=1e-5, msg=lambda s: f"{name}: {s}")


# The fused small-M path (M <= 16 with AVX2 + FMA; fp64 keeps the per-task tiles): M = 1 and the
# row limit on either side of it (16, 17), M not a multiple of the micro-kernels' 4 rows; K not a
# multiple of 8 (odd K, odd starts of rows, blocks that span rows: 100, 1000, 33) and K past one
# forward chunk (256) or backward column chunk (96) with a ragged end (1027); N = 1, 7, 129 (rows
# of Ŵ left over from the forward's groups of 3) and past one backward panel (32 rows).
FUSED_SHAPES = [(1, 100, 1, 4), (1, 1000, 7, 8), (1, 1027, 129, 4), (5, 100, 129, 8), (16, 1000, 7, 8),
                (16, 1027, 130, 4), (13, 33, 1, 2), (17, 100, 65, 4), (3, 8, 3, 1)]


@pytest.mark.parametrize("blocksize", [32, 256])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=shape_id)
def test_fused_small_m_matches_lora_linear_on_the_dequantised_weight(shape, dropout_p, blocksize,
                                                                     poison_uninitialized):
    m, k, n, r = shape
    w = quantized(n, k, blocksize, seed=3)
    t = {key: v.float() for key, v in make_inputs(m, k, n, r, seed=4).items()}
    ours = run_ops(w, t, True, dropout_p)
    dense = w.dequantize(torch.float32)
    seed = torch.tensor([SEED])
    out, xa = ops.lora_linear_fwd(t["x"], dense, t["bias"], t["lora_A"], t["lora_B"], SCALING, dropout_p, seed)
    grads = ops.lora_linear_bwd(t["grad_out"], t["x"], dense, t["lora_A"], t["lora_B"], xa, SCALING, dropout_p, seed)
    for name, got, want in zip(("out", "xa", "dx", "dA", "dB"), ours, (out, xa, *grads)):
        assert not torch.isnan(got).any(), name
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, atol=2e-6 * scale, rtol=1e-5, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=shape_id)
def test_fused_small_m_matches_fp64_reference(shape, dropout_p, dtype, poison_uninitialized):
    m, k, n, r = shape
    w = quantized(n, k, 64, seed=5)
    inputs = make_inputs(m, k, n, r, seed=6)
    out, xa, *grads = run_ops(w, {key: v.to(dtype) for key, v in inputs.items()}, True, dropout_p)
    ref_out, ref_grads = run_reference(w, inputs, torch.float64, True, dropout_p)
    eager_out, eager_grads = (None, (None,) * 3)
    if dtype == torch.bfloat16:
        eager_out, eager_grads = run_reference(w, inputs, dtype, True, dropout_p)
    assert_close(out, ref_out, eager_out, name="out")
    for name, got, want, eager in zip(("dx", "dA", "dB"), grads, ref_grads, eager_grads):
        assert_close(got, want, eager, name=name)


def test_fused_small_m_accumulates_onto_large_values():
    """The base GEMMs add onto the LoRA/bias terms already in out and dx (beta = 1): a large bias
    and LoRA branch must come through unchanged next to the base product."""
    m, k, n, r = 4, 200, 11, 2
    w = quantized(n, k, 64, seed=7)
    t = {key: v.float() for key, v in make_inputs(m, k, n, r, seed=8).items()}
    t["bias"] = t["bias"] * 1000
    t["lora_B"] = t["lora_B"] * 100
    ours = run_ops(w, t, True, 0.0)
    dense = w.dequantize(torch.float32)
    seed = torch.tensor([SEED])
    out, xa = ops.lora_linear_fwd(t["x"], dense, t["bias"], t["lora_A"], t["lora_B"], SCALING, 0.0, seed)
    grads = ops.lora_linear_bwd(t["grad_out"], t["x"], dense, t["lora_A"], t["lora_B"], xa, SCALING, 0.0, seed)
    for name, got, want in zip(("out", "xa", "dx", "dA", "dB"), ours, (out, xa, *grads)):
        torch.testing.assert_close(got, want, atol=2e-6 * want.abs().max().item(), rtol=1e-5,
                                   msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_fp64_reference(shape, dropout_p, dtype, poison_uninitialized):
    m, k, n, r = shape
    w = quantized(n, k, 128)
    inputs = make_inputs(m, k, n, r, seed=2)
    out, xa, *grads = run_ops(w, {key: v.to(dtype) for key, v in inputs.items()}, True, dropout_p)
    assert out.dtype == dtype and xa.dtype == dtype and all(g.dtype == dtype for g in grads)
    ref_out, ref_grads = run_reference(w, inputs, torch.float64, True, dropout_p)
    eager_out, eager_grads = (None, (None,) * 3)
    if dtype == torch.bfloat16:
        eager_out, eager_grads = run_reference(w, inputs, dtype, True, dropout_p)
    assert_close(out, ref_out, eager_out, name="out")
    for name, got, want, eager in zip(("dx", "dA", "dB"), grads, ref_grads, eager_grads):
        assert_close(got, want, eager, name=name)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_no_rows(dropout_p, poison_uninitialized):
    w = quantized(5, 13, 32)
    t = {key: v.float() for key, v in make_inputs(0, 13, 5, 3).items()}
    out, xa, dx, da, db = run_ops(w, t, True, dropout_p)
    assert out.shape == (0, 5) and xa.shape == (0, 3) and dx.shape == (0, 13)
    assert torch.equal(da, torch.zeros(3, 13)) and torch.equal(db, torch.zeros(5, 3))


def test_bad_direct_calls_name_the_op():
    w = quantized(5, 13, 32)
    t = {key: v.float() for key, v in make_inputs(4, 13, 5, 3).items()}
    seed = torch.tensor([SEED])

    def fwd(packed=w.packed, absmax=w.absmax, code=NF4_CODE, blocksize=32, n=5, x=t["x"]):
        return ops.qlora_linear_fwd(x, packed, absmax, code, blocksize, n, None, t["lora_A"], t["lora_B"], 1.0, 0.0,
                                    seed)

    cases = [
        (dict(packed=w.packed.to(torch.int8)), "packed must be uint8"),
        (dict(packed=w.packed[:-1]), "packed must be uint8"),
        (dict(absmax=w.absmax.double()), "absmax must be float32"),
        (dict(absmax=w.absmax[:-1]), "absmax must be float32"),
        (dict(blocksize=64), "absmax must be float32"),
        (dict(blocksize=48), "blocksize must be a power of two"),
        (dict(code=NF4_CODE[:8]), "code must be the 16 float32"),
        (dict(code=NF4_CODE.double()), "code must be the 16 float32"),
        (dict(n=6), "lora_B must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RuntimeError, match=f"deltakern.qlora_linear: {message}"):
            fwd(**kwargs)
    half = {key: v.half() for key, v in t.items()}
    with pytest.raises(RuntimeError, match="deltakern.qlora_linear: x must be float32, bfloat16 or float64 on CPU"):
        ops.qlora_linear_fwd(half["x"], w.packed, w.absmax, NF4_CODE, 32, 5, None, half["lora_A"], half["lora_B"],
                             1.0, 0.0, seed)
    with pytest.raises(RuntimeError, match="deltakern.qlora_linear: nf4_dequantize's dtype"):
        ops.nf4_dequantize(w.packed, w.absmax, NF4_CODE, 32, 5, 13, torch.int32)
    with pytest.raises(RuntimeError, match="deltakern.qlora_linear: packed must be uint8"):
        ops.nf4_dequantize(w.packed, w.absmax, NF4_CODE, 32, 5, 14, torch.float32)
