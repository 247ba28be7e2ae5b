"""The Triton kernels of qlora_linear (under TRITON_INTERPRET=1 on the CPU) against the reference.

Forward and backward launchers against ``deltakern.reference.qlora_linear`` in fp64 (autograd
for the gradients); the dequantisation inside each GEMM bit for bit against ``dequantize_nf4``;
and, with dropout, against lora_linear's Triton kernels on the dequantised weight, which draw the
same mask. The interpreter runs in numpy, so everything is fp32 and small: the launchers use the
interpreter config of lora_linear (16 x 32 x 32 GEMM tiles), so the shapes below still span
several tiles in each direction and end mid-tile.
"""

import math

import pytest
import torch

from deltakern.nf4 import NF4_CODE, quantize_nf4
from deltakern.reference.qlora_linear import qlora_linear as reference_qlora_linear
from deltakern.triton_kernels.lora_linear import lora_linear_bwd, lora_linear_fwd
from deltakern.triton_kernels.qlora_linear import qlora_linear_bwd, qlora_linear_fwd
from tests.tolerances import assert_close

SEED = 1234
SCALING = 0.75

# (M, K, N, R, blocksize). K even runs the byte-pair path of the kernels, K odd the per-element
# one. Blocks span rows whenever K is not a multiple of the blocksize.
SHAPES = [
    (5, 100, 7, 4, 64),     # K = 100 with blocks of 64: blocks span rows; K ends mid-tile
    (3, 33, 7, 3, 32),      # odd K and odd N * K = 231: rows start mid-byte, the last byte is half used
    (1, 64, 1, 1, 128),     # M = 1, N = 1, r = 1; one short block (64 < 128 values)
    (20, 46, 37, 8, 128),   # two row tiles, two column tiles, blocks span up to 3 rows
    (7, 1, 5, 2, 32),       # K = 1: every element is its own row; N * K odd
    (2, 131, 33, 16, 64),   # odd K over 5 K tiles, N just past a column tile
]


def shape_id(shape):
    return "M{}-K{}-N{}-r{}-bs{}".format(*shape)


def make_inputs(m, k, n, r, blocksize, bias=True, seed=0, nested=False):
    """fp32 inputs (fresh normals, scaled to O(1) outputs) and the NF4 weight quantised from one."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) / math.sqrt(k)
    return {
        "x": torch.randn(m, k, generator=g),
        "nf4": quantize_nf4(weight, blocksize, nested=nested),
        "bias": torch.randn(n, generator=g) if bias else None,
        "lora_A": torch.randn(r, k, generator=g) / math.sqrt(k),
        "lora_B": torch.randn(n, r, generator=g) / math.sqrt(r),
        "grad_out": torch.randn(m, n, generator=g),
    }


def triton_fwd(t, dropout_p, seed=SEED, scaling=SCALING):
    w = t["nf4"]
    return qlora_linear_fwd(t["x"], w.packed, w.absmax_fp32(), NF4_CODE, w.blocksize, w.shape[0], t["bias"],
                            t["lora_A"], t["lora_B"], scaling, dropout_p, seed)


def triton_bwd(t, xa, dropout_p, seed=SEED, scaling=SCALING):
    w = t["nf4"]
    return qlora_linear_bwd(t["grad_out"], t["x"], w.packed, w.absmax_fp32(), NF4_CODE, w.blocksize,
                            t["lora_A"], t["lora_B"], xa, scaling, dropout_p, seed)


def reference64(t, dropout_p):
    """Output and (dx, dA, dB) of the reference in fp64 (the NF4 weight read back to fp64: the
    same values as in fp32), gradients by autograd."""
    leaves = {name: t[name].double().requires_grad_(True) for name in ("x", "lora_A", "lora_B")}
    bias = None if t["bias"] is None else t["bias"].double()
    out = reference_qlora_linear(leaves["x"], t["nf4"], bias, leaves["lora_A"], leaves["lora_B"], SCALING,
                                 dropout_p, SEED)
    out.backward(t["grad_out"].double())
    return out.detach(), tuple(leaves[name].grad for name in ("x", "lora_A", "lora_B"))


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_fp64_reference(shape, dropout_p, poison_uninitialized):
    m, k, n, r, blocksize = shape
    t = make_inputs(m, k, n, r, blocksize, bias=(k + n) % 2 == 0)
    out, xa = triton_fwd(t, dropout_p)
    dx, da, db = triton_bwd(t, xa, dropout_p)
    ref_out, (ref_dx, ref_da, ref_db) = reference64(t, dropout_p)
    assert out.dtype == xa.dtype == dx.dtype == da.dtype == db.dtype == torch.float32
    assert xa.shape == (m, r)
    assert_close(out, ref_out, name="out")
    assert_close(dx, ref_dx, name="dx")
    assert_close(da, ref_da, name="dA")
    assert_close(db, ref_db, name="dB")


def test_bias_is_added():
    """The same inputs with and without bias differ by exactly the bias (per column)."""
    t = make_inputs(5, 100, 7, 4, 64, bias=True)
    with_bias, _ = triton_fwd(t, 0.0)
    without, _ = triton_fwd({**t, "bias": None}, 0.0)
    torch.testing.assert_close(with_bias - without, t["bias"].expand(5, 7), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("nested", [False, True], ids=["fp32-absmax", "nested-absmax"])
@pytest.mark.parametrize("shape", [(100, 7, 64), (33, 7, 32), (46, 37, 128), (1, 5, 32)], ids=str)
def test_gemms_dequantise_exactly(shape, nested, poison_uninitialized):
    """With an identity on the other side of each GEMM and no low-rank term, out = Ŵ^T and
    dx = Ŵ: each element is a single product with 1, so the kernels' dequantised tiles must equal
    ``NF4Weight.dequantize`` bit for bit (every nibble, block scale and row-spanning block)."""
    k, n, blocksize = shape
    t = make_inputs(1, k, n, 1, blocksize, bias=False, nested=nested)
    expected = t["nf4"].dequantize(torch.float32)
    zero_b = torch.zeros(n, 1)
    t.update(x=torch.eye(k), lora_B=zero_b)
    out, xa = triton_fwd(t, 0.0)
    assert torch.equal(out, expected.T)
    t.update(grad_out=torch.eye(n), x=torch.randn(n, k))
    dx, _, db = triton_bwd(t, torch.randn(n, 1), 0.0)
    assert torch.equal(dx, expected)


@pytest.mark.parametrize("shape", [(9, 100, 37, 8, 64), (6, 33, 7, 3, 32)], ids=shape_id)
def test_dropout_mask_matches_lora_linear_triton(shape):
    """qlora_linear with dropout equals lora_linear's Triton kernels on the dequantised weight for
    the same seed (same mask, to fp32 rounding), and another seed gives another result."""
    m, k, n, r, blocksize = shape
    t = make_inputs(m, k, n, r, blocksize)
    dense = t["nf4"].dequantize(torch.float32)
    p = 0.5
    out, xa = triton_fwd(t, p)
    dx, da, db = triton_bwd(t, xa, p)
    lora_out, lora_xa = lora_linear_fwd(t["x"], dense, t["bias"], t["lora_A"], t["lora_B"], SCALING, p, SEED)
    lora_grads = lora_linear_bwd(t["grad_out"], t["x"], dense, t["lora_A"], t["lora_B"], lora_xa, SCALING, p, SEED)
    for name, got, want in [("out", out, lora_out), ("xa", xa, lora_xa), ("dx", dx, lora_grads[0]),
                            ("dA", da, lora_grads[1]), ("dB", db, lora_grads[2])]:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=lambda s: f"{name}: {s}")
    # The mask is in use: another seed changes xa and every gradient of the low-rank branch.
    other_out, other_xa = triton_fwd(t, p, seed=SEED + 1)
    other_dx, other_da, _ = triton_bwd(t, other_xa, p, seed=SEED + 1)
    assert (other_xa - xa).abs().max() > 0.1
    assert (other_out - out).abs().max() > 0.05
    assert (other_dx - dx).abs().max() > 0.05
    assert (other_da - da).abs().max() > 0.05


def test_no_rows():
    """M = 0: empty outputs of the right shapes, and zero dA / dB."""
    t = make_inputs(1, 100, 7, 4, 64)
    t.update(x=torch.empty(0, 100), grad_out=torch.empty(0, 7))
    out, xa = triton_fwd(t, 0.1)
    dx, da, db = triton_bwd(t, xa, 0.1)
    assert out.shape == (0, 7) and xa.shape == (0, 4) and dx.shape == (0, 100)
    assert torch.equal(da, torch.zeros(4, 100)) and torch.equal(db, torch.zeros(7, 4))
