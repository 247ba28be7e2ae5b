"""lora_linear on every backend that runs here against the fp64 reference."""

import itertools
import math

import pytest
import torch

import deltakern
from deltakern.reference.lora_linear import lora_linear as reference_lora_linear
from tests.tolerances import assert_backend_matches_reference

M_SIZES = (1, 7, 129)
FEATURES = (1, 13, 96, 257)
RANKS = (1, 8, 16)
DROPOUTS = (0.0, 0.1)
SEED = 1234

# Every (M, in, out, r) for the C++ and reference backends; for Triton, whose interpreter is slow,
# each M meets each `in` once, with `out` and r cycling so every value of each is covered.
FULL_SHAPES = list(itertools.product(M_SIZES, FEATURES, FEATURES, RANKS))
COVERING_SHAPES = [
    (m, k, FEATURES[(i + 1) % len(FEATURES)], RANKS[i % len(RANKS)])
    for i, (m, k) in enumerate(itertools.product(M_SIZES, FEATURES))
]


def make_inputs(shape_x, n, r, bias=True, seed=0):
    """fp64 inputs: x of shape ``shape_x`` (last dim = in), weights scaled to keep outputs O(1)."""
    g = torch.Generator().manual_seed(seed)
    k = shape_x[-1]
    d = torch.float64
    return {
        "x": torch.randn(shape_x, generator=g, dtype=d),
        "weight": torch.randn(n, k, generator=g, dtype=d) / math.sqrt(max(k, 1)),
        "bias": torch.randn(n, generator=g, dtype=d) if bias else None,
        "lora_A": torch.randn(r, k, generator=g, dtype=d) / math.sqrt(max(k, 1)),
        "lora_B": torch.randn(n, r, generator=g, dtype=d) / math.sqrt(r),
        "grad_out": torch.randn(*shape_x[:-1], n, generator=g, dtype=d),
    }


def run(fn, inputs, dtype, scaling, dropout_p, grad_names=("x", "lora_A", "lora_B")):
    """Output and gradients of ``fn`` on ``inputs`` cast to ``dtype``."""
    t = {k: (None if v is None else v.detach().to(dtype, copy=True)) for k, v in inputs.items()}
    for name in grad_names:
        t[name].requires_grad_(True)
    out = fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], scaling, dropout_p, SEED)
    out.backward(t["grad_out"])
    return out.detach(), {name: t[name].grad for name in grad_names}


def check_against_reference(backend, inputs, dtype, dropout_p, scaling=0.75, grad_names=("x", "lora_A", "lora_B")):
    assert_backend_matches_reference(backend, deltakern.lora_linear, reference_lora_linear, run, inputs, dtype,
                                     scaling, dropout_p, grad_names)


def shape_id(shape):
    return "M{}-in{}-out{}-r{}".format(*shape)


@pytest.mark.parametrize("dropout_p", DROPOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", FULL_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fp32_matches_reference(backend, shape, bias, dropout_p, poison_uninitialized):
    m, k, n, r = shape
    check_against_reference(backend, make_inputs((m, k), n, r, bias), torch.float32, dropout_p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_dropout_over_several_row_blocks_per_thread(dtype, poison_uninitialized):
    """The CPU dropout kernels drop x in row blocks of at most 512 rows per thread: 2 threads on
    1100 rows each take two blocks, the second a partial one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_against_reference("cpu", make_inputs((1100, 8), 5, 4), dtype, 0.1)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dropout_p", DROPOUTS)
@pytest.mark.parametrize("shape", [(0, 13, 5, 4), (7, 0, 5, 4), (7, 13, 0, 4)], ids=shape_id)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_empty_extents(backend, shape, dropout_p, poison_uninitialized):
    """A 3-D x with no rows, no input features (the output is the bias) or no output features."""
    m, k, n, r = shape
    check_against_reference(backend, make_inputs((2, m, k), n, r), torch.float32, dropout_p)


@pytest.mark.parametrize("dropout_p", DROPOUTS)
@pytest.mark.parametrize("shape", COVERING_SHAPES, ids=shape_id)
def test_triton_fp32_matches_reference(shape, dropout_p, poison_uninitialized):
    m, k, n, r = shape
    check_against_reference("triton", make_inputs((m, k), n, r, bias=(k + n) % 2 == 0), torch.float32, dropout_p)


@pytest.mark.parametrize("dropout_p", DROPOUTS)
@pytest.mark.parametrize("shape", COVERING_SHAPES, ids=shape_id)
def test_cpu_bf16_matches_reference(shape, dropout_p, poison_uninitialized):
    m, k, n, r = shape
    check_against_reference("cpu", make_inputs((m, k), n, r), torch.bfloat16, dropout_p)


@pytest.mark.parametrize("dropout_p", DROPOUTS)
@pytest.mark.parametrize("shape_x", [(1, 1, 13), (1, 7, 96), (3, 43, 257)], ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_3d_input_matches_reference(backend, shape_x, dropout_p, poison_uninitialized):
    check_against_reference(backend, make_inputs(shape_x, 13, 8), torch.float32, dropout_p)


@pytest.mark.parametrize("dropout_p", DROPOUTS)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_weight_and_bias_gradients_when_trainable(backend, dropout_p):
    grad_names = ("x", "weight", "bias", "lora_A", "lora_B")
    inputs = make_inputs((2, 7, 96), 13, 8)
    check_against_reference(backend, inputs, torch.float32, dropout_p, grad_names=grad_names)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout_mask_is_shared_by_backends(backend):
    """Same seed, same mask: outputs equal the reference's to rounding, and differ for another seed."""
    inputs = {k: v.float() for k, v in make_inputs((64, 96), 13, 8, bias=False).items() if v is not None}
    args = (inputs["x"], inputs["weight"], None, inputs["lora_A"], inputs["lora_B"], 2.0, 0.5)
    expected = reference_lora_linear(*args, seed=SEED)
    with deltakern.use_backend(backend):
        same = deltakern.lora_linear(*args, seed=SEED)
        other = deltakern.lora_linear(*args, seed=SEED + 1)
    torch.testing.assert_close(same, expected, atol=2e-5, rtol=2e-5)
    assert (other - expected).abs().max() > 0.1


def test_seed_none_follows_torch_manual_seed():
    inputs = make_inputs((32, 96), 13, 8)
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"], 2.0, 0.5)
    torch.manual_seed(7)
    first = deltakern.lora_linear(*args)
    torch.manual_seed(7)
    again = deltakern.lora_linear(*args)
    fresh = deltakern.lora_linear(*args)
    assert torch.equal(first, again)
    assert not torch.equal(first, fresh)


@pytest.mark.parametrize("dropout_p", DROPOUTS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64(backend, dropout_p):
    inputs = make_inputs((5, 7), 6, 3)
    x, w, b, a, bb = (inputs[k].requires_grad_() for k in ("x", "weight", "bias", "lora_A", "lora_B"))

    def fn(x, w, b, a, bb):
        return deltakern.lora_linear(x, w, b, a, bb, 0.5, dropout_p, seed=SEED)

    with deltakern.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))


@pytest.mark.parametrize("dropout_p", DROPOUTS)
def test_opcheck_cpu_ops(dropout_p):
    inputs = make_inputs((7, 13), 5, 3)
    x, w, b, a, bb, g = (inputs[k].float() for k in ("x", "weight", "bias", "lora_A", "lora_B", "grad_out"))
    for t in (x, a, bb):
        t.requires_grad_(True)
    seed = torch.tensor(SEED)
    torch.library.opcheck(torch.ops.deltakern.lora_linear_fwd.default, (x, w, b, a, bb, 0.5, dropout_p, seed))
    xa = x.detach() @ a.detach().t()
    bwd_args = (g, x.detach(), w, a.detach(), bb.detach(), xa, 0.5, dropout_p, seed)
    torch.library.opcheck(torch.ops.deltakern.lora_linear_bwd.default, bwd_args)


def test_opcheck_triton_ops():
    inputs = make_inputs((7, 13), 5, 3)
    x, w, b, a, bb, g = (inputs[k].float() for k in ("x", "weight", "bias", "lora_A", "lora_B", "grad_out"))
    for t in (x, a, bb):
        t.requires_grad_(True)
    seed = torch.tensor(SEED)
    torch.library.opcheck(torch.ops.deltakern.lora_linear_fwd_triton.default, (x, w, b, a, bb, 0.5, 0.1, seed))
    xa = x.detach() @ a.detach().t()
    bwd_args = (g, x.detach(), w, a.detach(), bb.detach(), xa, 0.5, 0.1, seed)
    torch.library.opcheck(torch.ops.deltakern.lora_linear_bwd_triton.default, bwd_args)
