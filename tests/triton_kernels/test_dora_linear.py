"""The Triton kernels of dora_linear (under TRITON_INTERPRET=1 on the CPU) against the reference.

Through the public op (``deltakern.dora_linear`` on the triton backend): the output and the
gradients of x, lora_A, lora_B and the magnitude against ``deltakern.reference.dora_linear`` in
fp64, with and without dropout, with the magnitude trainable (the forward saves z) or frozen (it
does not). Through the launchers: the contract's xa, z and d_scale, and their empty placeholders.
The interpreter runs in numpy, so everything is fp32 and small; the launchers use lora_linear's
interpreter config (16 x 32 x 32 GEMM tiles), so the shapes below still span several tiles in each
direction and end mid-tile.
"""

import math

import pytest
import torch

import deltakern
from deltakern.ops.dora_linear import dora_weight_norm, weight_row_sqnorm
from deltakern.reference.dora_linear import dora_linear as reference_dora_linear
from deltakern.reference.lora_linear import dropout as reference_dropout
from deltakern.reference.philox import dropout_keep_mask
from deltakern.triton_kernels import dora_linear as kernels
from deltakern.triton_kernels.dora_linear import dora_linear_bwd, dora_linear_fwd
from tests.tolerances import assert_backend_matches_reference, assert_close

SEED = 1234
SCALING = 0.75

# (M, in, out, r): awkward sizes around the 16 x 32 x 32 interpreter tiles.
SHAPES = [
    (7, 40, 37, 3),     # one row tile, two column tiles, two K steps, all ending mid-tile
    (1, 13, 5, 1),      # M = 1, r = 1
    (33, 70, 65, 16),   # three tiles each way, r = 16 fills the rank block
    (17, 1, 31, 2),     # in = 1
    (5, 31, 1, 7),      # out = 1
]


def shape_id(shape):
    return "M{}-in{}-out{}-r{}".format(*shape)


def make_inputs(m, k, n, r, bias=True, seed=0):
    """fp64 inputs, fresh normals scaled to O(1) outputs; magnitudes spread around the row norms
    (about 1) so that c = magnitude / norm and c - 1 are both far from 0."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    return {
        "x": torch.randn(m, k, generator=g, dtype=d),
        "weight": torch.randn(n, k, generator=g, dtype=d) / math.sqrt(k),
        "bias": torch.randn(n, generator=g, dtype=d) if bias else None,
        "lora_A": torch.randn(r, k, generator=g, dtype=d) / math.sqrt(k),
        "lora_B": torch.randn(n, r, generator=g, dtype=d) / math.sqrt(r),
        "magnitude": 0.5 + torch.rand(n, generator=g, dtype=d),
        "grad_out": torch.randn(m, n, generator=g, dtype=d),
    }


def run(fn, inputs, dtype, dropout_p, grad_names, weight_transposed=False):
    """Output and gradients (by input name) of ``fn`` on ``inputs`` cast to ``dtype``."""
    t = {k: (None if v is None else v.detach().to(dtype, copy=True)) for k, v in inputs.items()}
    if weight_transposed:
        # transformers' Conv1D keeps the weight as [in, out]; the op receives its transposed view.
        t["weight"] = t["weight"].t().contiguous().t()
    for name in grad_names:
        t[name].requires_grad_(True)
    out = fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["magnitude"], SCALING, dropout_p, SEED)
    out.backward(t["grad_out"])
    return out.detach(), {name: t[name].grad for name in grad_names}


@pytest.mark.parametrize("magnitude_grad", [True, False], ids=["magnitude", "frozen-magnitude"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["nodrop", "drop"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_fp64_reference(shape, dropout_p, magnitude_grad, poison_uninitialized):
    m, k, n, r = shape
    names = ("x", "lora_A", "lora_B") + (("magnitude",) if magnitude_grad else ())
    assert_backend_matches_reference("triton", deltakern.dora_linear, reference_dora_linear, run,
                                     make_inputs(m, k, n, r, bias=(k + n) % 2 == 0), torch.float32, dropout_p, names)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["nodrop", "drop"])
def test_transposed_weight_is_read_in_place(dropout_p, poison_uninitialized):
    """A Conv1D weight (a transposed view, unit stride along out) gives the reference's numbers."""
    inputs = make_inputs(20, 45, 38, 5)
    names = ("x", "lora_A", "lora_B", "magnitude")
    with deltakern.use_backend("triton"):
        out, grads = run(deltakern.dora_linear, inputs, torch.float32, dropout_p, names, weight_transposed=True)
    ref_out, ref_grads = run(reference_dora_linear, inputs, torch.float64, dropout_p, names)
    assert_close(out, ref_out, name="out")
    for name in names:
        assert_close(grads[name], ref_grads[name], name=f"d{name}")


def contract64(t, dropout_p):
    """The kernel contract in fp64: scale c, xa, z, y and, for grad_out, dx, dA, dB, d_scale."""
    x, w, a, b, g = t["x"], t["weight"], t["lora_A"], t["lora_B"], t["grad_out"]
    c = t["magnitude"] / dora_weight_norm(w, a, b, SCALING, weight_row_sqnorm(w))
    x_drop = reference_dropout(x, dropout_p, SEED)
    xa = x_drop @ a.T
    lowrank = SCALING * xa @ b.T
    z = x_drop @ w.T + lowrank
    bias = 0.0 if t["bias"] is None else t["bias"]
    gc = c * g
    dxa = SCALING * gc @ b
    if dropout_p == 0.0:
        y = c * z + bias
        dx = gc @ w + dxa @ a
    else:
        y = x @ w.T + bias + (c - 1) * (x_drop @ w.T) + c * lowrank
        keep = dropout_keep_mask(SEED, x.shape[0], x.shape[1], dropout_p, device=x.device)
        dx = g @ w + keep / (1.0 - dropout_p) * (((c - 1) * g) @ w + dxa @ a)
    return c, xa, z, y, (dx, dxa.T @ x_drop, SCALING * gc.T @ xa, (g * z).sum(0))


@pytest.mark.parametrize("save_z", [True, False], ids=["save_z", "no_z"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
def test_launchers_follow_the_contract(dropout_p, save_z, poison_uninitialized):
    """xa, z, y and dx, dA, dB, d_scale of the launchers against the contract's formulas in fp64;
    without save_z, z and d_scale are the empty ``[0]`` placeholders."""
    t = make_inputs(21, 50, 35, 4)
    c, xa64, z64, y64, grads64 = contract64(t, dropout_p)
    f = {k: v.float() for k, v in t.items()}
    y, xa, z = dora_linear_fwd(f["x"], f["weight"], f["bias"], f["lora_A"], f["lora_B"], c.float(), SCALING,
                               dropout_p, SEED, save_z)
    dx, da, db, d_scale = dora_linear_bwd(f["grad_out"], f["x"], f["weight"], f["lora_A"], f["lora_B"], c.float(),
                                          xa, z, SCALING, dropout_p, SEED)
    assert y.dtype == xa.dtype == z.dtype == dx.dtype == da.dtype == db.dtype == d_scale.dtype == torch.float32
    assert_close(y, y64, name="y")
    assert_close(xa, xa64, name="xa")
    for name, got, want in zip(("dx", "dA", "dB"), (dx, da, db), grads64):
        assert_close(got, want, name=name)
    if save_z:
        assert_close(z, z64, name="z")
        assert_close(d_scale, grads64[3], name="d_scale")
    else:
        assert z.shape == (0,) and d_scale.shape == (0,)


def test_dropout_row_blocks(monkeypatch, poison_uninitialized):
    """x̃ written 128 rows at a time (the block bound set to its minimum) gives bit for bit the
    results of one block, and the reference's: each block draws its rows' mask by their global
    element index."""
    t = make_inputs(130, 21, 19, 3)
    names = ("x", "lora_A", "lora_B", "magnitude")
    with deltakern.use_backend("triton"):
        one_block = run(deltakern.dora_linear, t, torch.float32, 0.3, names)
        monkeypatch.setattr(kernels, "_DROP_CHUNK_VALUES", 1)
        assert kernels._drop_chunk_rows(21) == 128
        blocks = run(deltakern.dora_linear, t, torch.float32, 0.3, names)
    assert torch.equal(blocks[0], one_block[0])
    for name in names:
        assert torch.equal(blocks[1][name], one_block[1][name]), name
    ref_out, ref_grads = run(reference_dora_linear, t, torch.float64, 0.3, names)
    assert_close(blocks[0], ref_out, name="out")
    for name in names:
        assert_close(blocks[1][name], ref_grads[name], name=f"d{name}")


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["nodrop", "drop"])
def test_no_rows(dropout_p):
    """M = 0: empty outputs of the right shapes, and zero dA, dB and d_scale."""
    t = {k: v.float() for k, v in make_inputs(1, 40, 7, 4).items()}
    x, g, c = torch.empty(0, 40), torch.empty(0, 7), torch.rand(7) + 0.5
    y, xa, z = dora_linear_fwd(x, t["weight"], t["bias"], t["lora_A"], t["lora_B"], c, SCALING, dropout_p, SEED, True)
    dx, da, db, d_scale = dora_linear_bwd(g, x, t["weight"], t["lora_A"], t["lora_B"], c, xa, z, SCALING, dropout_p,
                                          SEED)
    assert y.shape == z.shape == (0, 7) and xa.shape == (0, 4) and dx.shape == (0, 40)
    assert torch.equal(da, torch.zeros(4, 40)) and torch.equal(db, torch.zeros(7, 4))
    assert torch.equal(d_scale, torch.zeros(7))
