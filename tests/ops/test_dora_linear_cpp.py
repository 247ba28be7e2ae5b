"""The C++ CPU kernels of dora_linear (csrc/cpu/dora_linear.cpp, csrc/dora_linear.cpp), called
directly as torch.ops.deltakern.dora_linear_fwd / _bwd with the column scale c as an input (and,
marked gpu, the CUDA ops).

Covers both CPU recipes (dropout_p in (0, 0.35]: one base GEMM each way plus the sparse passes
over the dropped elements; p == 0 and p > 0.35: lora_linear's decomposition, with two base GEMMs
each way when p > 0) against the fp64 formula of the contract, with the tolerances of tests/tolerances.py;
d_scale = Σ_rows grad_out ⊙ z for any z and the empty [0] z placeholder; the epilogue rounding
y once; transposed (Conv1D) weights and non-contiguous inputs; empty extents; the dropout mask
shared with lora_linear; run-to-run determinism; the largest allocation; the C++ checks."""

import math

import deltakern._C  # noqa: F401  (registers torch.ops.deltakern)
import pytest
import torch

from deltakern.reference.lora_linear import dropout as reference_dropout
from tests.tolerances import assert_close

ops = torch.ops.deltakern
SEED = 4321
SCALING = 0.75
# p = 0.35 is the sparse recipe's largest p (kSparseMaxP), 0.5 and 0.7 take the two-GEMM recipe.
PS = [0.0, 0.1, 0.35, 0.5, 0.7]
# (M, K, N, R): M = 1, prime sizes, r = 1; N > 64 and K > 64 with partial column blocks and
# chunks; K % 4 != 0 (chunks whose Philox groups straddle rows) and K % 4 == 0 (aligned chunks).
SHAPES = [(1, 13, 7, 1), (7, 96, 13, 8), (129, 33, 65, 16), (5, 257, 1, 4), (70, 130, 200, 3), (33, 128, 72, 5)]


def make_inputs(m, k, n, r, seed=0):
    """fp64 inputs; the scale c around 1 ± 30%, never 1."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    return {
        "x": torch.randn(m, k, generator=g, dtype=d),
        "weight": torch.randn(n, k, generator=g, dtype=d) / math.sqrt(max(k, 1)),
        "bias": torch.randn(n, generator=g, dtype=d),
        "lora_A": torch.randn(r, k, generator=g, dtype=d) / math.sqrt(max(k, 1)),
        "lora_B": torch.randn(n, r, generator=g, dtype=d) / math.sqrt(r),
        "scale": 1.0 + 0.3 * (2 * torch.rand(n, generator=g, dtype=d) - 1),
        "grad_out": torch.randn(m, n, generator=g, dtype=d),
    }


def scale_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(inputs, dtype, device="cpu"):
    t = {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}
    t["scale"] = inputs["scale"].to(device=device, dtype=scale_dtype(dtype))
    return t


def run_ops(t, dropout_p, bias=True, save_z=True):
    """(y, xa, z, dx, dA, dB, d_scale) of the C++ ops on the tensors t."""
    seed = torch.tensor(SEED)
    y, xa, z = ops.dora_linear_fwd(t["x"], t["weight"], t["bias"] if bias else None, t["lora_A"], t["lora_B"],
                                   t["scale"], SCALING, dropout_p, seed, save_z)
    dx, da, db, ds = ops.dora_linear_bwd(t["grad_out"], t["x"], t["weight"], t["lora_A"], t["lora_B"], t["scale"], xa,
                                         z, SCALING, dropout_p, seed)
    return y, xa, z, dx, da, db, ds


def formula(x, w, b, a, bb, c, dropout_p):
    """The contract's forward (y, xa, z) in torch ops; autograd gives the backward."""
    xd = reference_dropout(x, dropout_p, SEED)
    xa = xd @ a.t()
    base = xd @ w.t()
    lowrank = SCALING * (xa @ bb.t())
    z = base + lowrank
    if dropout_p == 0.0:
        y = c * z
    else:
        y = x @ w.t() + (c - 1) * base + c * lowrank
    if b is not None:
        y = y + b
    return y, xa, z


def run_formula(inputs, dtype, dropout_p, bias=True, device="cpu"):
    """(y, xa, z, dx, dA, dB, d_scale) of the formula in dtype (the scale too), by autograd."""
    t = {k: v.detach().to(device=device, dtype=dtype).requires_grad_(k in ("x", "lora_A", "lora_B", "scale"))
         for k, v in inputs.items()}
    y, xa, z = formula(t["x"], t["weight"], t["bias"] if bias else None, t["lora_A"], t["lora_B"], t["scale"],
                       dropout_p)
    y.backward(t["grad_out"])
    return y.detach(), xa.detach(), z.detach(), t["x"].grad, t["lora_A"].grad, t["lora_B"].grad, t["scale"].grad


NAMES = ("y", "xa", "z", "dx", "dA", "dB", "d_scale")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("dropout_p", PS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_fp64_formula(shape, dropout_p, dtype, poison_uninitialized):
    inputs = make_inputs(*shape)
    bias = shape[0] != 7
    ours = run_ops(cast(inputs, dtype), dropout_p, bias)
    expected = run_formula(inputs, torch.float64, dropout_p, bias)
    eager = run_formula(inputs, dtype, dropout_p, bias) if dtype == torch.bfloat16 else [None] * len(NAMES)
    for name, a, e, lowp in zip(NAMES, ours, expected, eager):
        if name == "d_scale":  # in scale's dtype (fp32 for bf16 inputs): compared in the inputs' dtype
            assert a.dtype == scale_dtype(dtype)
            a = a.to(dtype)
        assert a.dtype == dtype, name
        assert_close(a, e, lowp, name=f"{name} p={dropout_p}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1, 0.7])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cuda_ops_match_fp64_formula(shape, dropout_p, dtype):
    """The CUDA ops (the device-neutral recipe: cuBLAS and csrc/cuda/dora_linear.cu), as the CPU
    ones above; z and d_scale too, and the z placeholder."""
    inputs = make_inputs(*shape)
    t = cast(inputs, dtype, "cuda")
    ours = [a.cpu() for a in run_ops(t, dropout_p)]
    expected = run_formula(inputs, torch.float64, dropout_p)
    eager = ([a.cpu() for a in run_formula(inputs, dtype, dropout_p, device="cuda")] if dtype != torch.float32
             else [None] * len(NAMES))
    for name, a, e, lowp in zip(NAMES, ours, expected, eager):
        assert_close(a.to(dtype), e, lowp, name=f"cuda {name} p={dropout_p}")
    y0, xa0, z0, *grads0 = (a.cpu() for a in run_ops(t, dropout_p, save_z=False))
    assert z0.shape == (0,) and grads0[-1].shape == (0,)
    for a, b in zip((y0, xa0, *grads0[:3]), (ours[0], ours[1], *ours[3:6])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("dropout_p", PS)
def test_d_scale_is_the_column_sum_of_grad_out_times_z(dropout_p, dtype):
    """d_scale [N] = Σ_rows grad_out ⊙ z for whatever z the caller passes, summed in fp32 or wider
    (so in bf16 it is the sum of the exact products); the other gradients do not read z."""
    inputs = make_inputs(300, 40, 70, 4)
    t = cast(inputs, dtype)
    z = torch.randn(300, 70, dtype=torch.float64).to(dtype)
    seed = torch.tensor(SEED)
    _, xa, _ = ops.dora_linear_fwd(t["x"], t["weight"], None, t["lora_A"], t["lora_B"], t["scale"], SCALING,
                                   dropout_p, seed, False)
    args = (t["x"], t["weight"], t["lora_A"], t["lora_B"], t["scale"], xa)
    *grads, ds = ops.dora_linear_bwd(t["grad_out"], *args, z, SCALING, dropout_p, seed)
    *grads_no_z, ds_none = ops.dora_linear_bwd(t["grad_out"], *args, z.new_empty(0), SCALING, dropout_p, seed)
    terms = t["grad_out"].double() * z.double()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert ds.dtype == scale_dtype(dtype) and ds.shape == (70,)
    torch.testing.assert_close(ds.double(), terms.sum(0), atol=tol * terms.abs().sum(0).max().item(), rtol=0)
    assert ds_none.shape == (0,) and ds_none.dtype == scale_dtype(dtype)
    for a, b in zip(grads, grads_no_z):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("dropout_p", PS)
def test_z_placeholder_changes_nothing_else(dropout_p, dtype):
    """save_z=False returns the empty [0] z and the same y and xa, bit for bit."""
    t = cast(make_inputs(65, 70, 90, 6), dtype)
    seed = torch.tensor(SEED)
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["scale"], SCALING, dropout_p, seed)
    y, xa, z = ops.dora_linear_fwd(*args, True)
    y0, xa0, z0 = ops.dora_linear_fwd(*args, False)
    assert z.shape == (65, 90) and z0.shape == (0,) and z0.dtype == dtype
    assert torch.equal(y, y0) and torch.equal(xa, xa0)


@pytest.mark.parametrize("save_z", [True, False])
def test_bf16_epilogue_rounds_once(save_z):
    """Without dropout y = c ⊙ z + b is computed in fp32 from the bf16 z and rounded once: within
    half a bf16 ulp of the exact value (plus fp32's rounding), written next to z or over it."""
    t = cast(make_inputs(130, 96, 300, 8), torch.bfloat16)
    seed = torch.tensor(0)
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["scale"], SCALING, 0.0, seed)
    y, _, z = ops.dora_linear_fwd(*args, True)
    if not save_z:
        y, _, _ = ops.dora_linear_fwd(*args, False)
    exact = t["scale"].double() * z.double() + t["bias"].double()
    _, exponent = torch.frexp(exact)
    half_ulp = torch.ldexp(torch.ones_like(exact), exponent - 9)  # bf16: 8 significant bits
    # fp32's own rounding of c · z + b is 2^-24 of it, 2^-15 of the half ulp.
    err = (y.double() - exact).abs()
    assert (err <= half_ulp * (1 + 2.0**-14)).all(), (err / half_ulp).max()


@pytest.mark.parametrize("dropout_p", PS)
def test_transposed_weight_and_non_contiguous_inputs(dropout_p):
    """A Conv1D weight stored [in, out] and passed as its transposed view, and strided x and
    grad_out, give what the contiguous tensors give."""
    inputs = cast(make_inputs(40, 70, 90, 6), torch.float32)
    contiguous = run_ops(inputs, dropout_p)
    strided = dict(inputs)
    strided["weight"] = inputs["weight"].t().contiguous().t()
    wide_x = torch.zeros(40, 140)
    wide_x[:, ::2] = inputs["x"]
    strided["x"] = wide_x[:, ::2]
    strided["grad_out"] = inputs["grad_out"].t().contiguous().t()
    assert not strided["weight"].is_contiguous() and not strided["x"].is_contiguous()
    for name, a, b in zip(NAMES, run_ops(strided, dropout_p), contiguous):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1, 0.7])
@pytest.mark.parametrize("shape", [(0, 13, 7, 2), (3, 0, 5, 2), (4, 9, 0, 2)], ids=["M0", "K0", "N0"])
def test_empty_extents(shape, dropout_p, poison_uninitialized):
    """M, K or N = 0: the outputs have their shapes and the values of the formula (zeros, or b)."""
    inputs = make_inputs(*shape)
    ours = run_ops(cast(inputs, torch.float32), dropout_p)
    expected = run_formula(inputs, torch.float64, dropout_p)
    for name, a, e in zip(NAMES, ours, expected):
        assert a.shape == e.shape, name
        torch.testing.assert_close(a.double(), e, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("dropout_p", [0.1, 0.35, 0.7])
def test_dropout_mask_is_lora_linears(dropout_p):
    """xa = x̃ Aᵀ of dora equals lora_linear's xa for the same seed: one mask for the LoRA family."""
    t = cast(make_inputs(70, 130, 20, 8), torch.float32)
    seed = torch.tensor(SEED)
    _, xa = ops.lora_linear_fwd(t["x"], t["weight"], None, t["lora_A"], t["lora_B"], SCALING, dropout_p, seed)
    _, xa_dora, _ = ops.dora_linear_fwd(t["x"], t["weight"], None, t["lora_A"], t["lora_B"], t["scale"], SCALING,
                                        dropout_p, seed, False)
    torch.testing.assert_close(xa_dora, xa, atol=1e-6, rtol=1e-6)
    other, _, _ = ops.dora_linear_fwd(t["x"], t["weight"], None, t["lora_A"], t["lora_B"], t["scale"], SCALING,
                                      dropout_p, torch.tensor(SEED + 1), False)
    assert not torch.allclose(other, ops.dora_linear_fwd(t["x"], t["weight"], None, t["lora_A"], t["lora_B"],
                                                         t["scale"], SCALING, dropout_p, seed, False)[0])


@pytest.mark.parametrize("dropout_p", PS)
def test_deterministic_run_to_run(dropout_p):
    t = cast(make_inputs(300, 200, 150, 8), torch.float32)
    first = run_ops(t, dropout_p)
    for a, b in zip(run_ops(t, dropout_p), first):
        assert torch.equal(a, b)


def _largest_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    return max(size for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline
               if action == Action.CREATE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1, 0.7])
def test_no_allocation_of_out_by_in_size(dropout_p, dtype):
    """The kernels' largest tensor (buffers of the sparse passes and the drop(x) blocks included)
    is an activation [M, in] / [M, out] (256 KiB here), a quarter of W at most."""
    m, k, n, r = 64, 1024, 1024, 16
    t = cast(make_inputs(m, k, n, r), dtype)
    run_ops(t, dropout_p)  # warm-up: one-time allocations out of the way
    largest = _largest_allocation(lambda: run_ops(t, dropout_p))
    assert largest <= n * k * dtype.itemsize // 4, largest


def test_bad_direct_calls_name_the_op():
    t = cast(make_inputs(3, 5, 4, 2), torch.float32)
    seed = torch.tensor(SEED)

    def fwd(**change):
        a = {"x": t["x"], "weight": t["weight"], "bias": t["bias"], "lora_A": t["lora_A"], "lora_B": t["lora_B"],
             "scale": t["scale"], "dropout_p": 0.1, "seed": seed, **change}
        ops.dora_linear_fwd(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["scale"], SCALING,
                            a["dropout_p"], a["seed"], True)

    _, xa, z = ops.dora_linear_fwd(t["x"], t["weight"], None, t["lora_A"], t["lora_B"], t["scale"], SCALING, 0.1,
                                   seed, True)

    def bwd(**change):
        a = {"grad_out": t["grad_out"], "xa": xa, "z": z, **change}
        ops.dora_linear_bwd(a["grad_out"], t["x"], t["weight"], t["lora_A"], t["lora_B"], t["scale"], a["xa"],
                            a["z"], SCALING, 0.1, seed)

    cases = [
        (lambda: fwd(x=t["x"][0]), r"x must be 2-D \[M, K\]"),
        (lambda: fwd(weight=t["weight"][:, :4]), r"weight must be \[N, K\] with K = 5"),
        (lambda: fwd(lora_A=t["lora_A"][:, :4]), r"lora_A must be \[R, K\] with K = 5"),
        (lambda: fwd(lora_B=t["lora_B"][:3]), r"lora_B must be \[N, R\] = \[4, 2\]"),
        (lambda: fwd(scale=t["scale"][:3]), r"scale must be \[N\] = \[4\]"),
        (lambda: fwd(scale=t["scale"].double()), "scale must be Float for Float inputs"),
        (lambda: fwd(bias=t["bias"][:3]), r"bias must be \[N\] = \[4\]"),
        (lambda: fwd(lora_B=t["lora_B"].double()), "lora_B must have x's dtype Float"),
        (lambda: fwd(seed=torch.tensor([1, 2])), "seed must be a one-element int64 CPU tensor"),
        (lambda: fwd(seed=torch.tensor(1, dtype=torch.int32)), "seed must be a one-element int64 CPU tensor"),
        (lambda: fwd(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
        (lambda: bwd(grad_out=t["grad_out"][:, :3]), r"grad_out must be \[M, N\] = \[3, 4\]"),
        (lambda: bwd(xa=xa[:, :1]), r"xa must be \[M, R\] = \[3, 2\]"),
        (lambda: bwd(z=z[:, :3]), r"z must be \[M, N\] = \[3, 4\] or the empty \[0\] placeholder"),
        (lambda: bwd(z=z.double()), "z must have x's dtype Float"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=f"deltakern.dora_linear: {message}"):
            call()
    h = {k: v.half() for k, v in t.items()}
    with pytest.raises(RuntimeError, match="deltakern.dora_linear: CPU kernels take float32, bfloat16 or float64"):
        ops.dora_linear_fwd(h["x"], h["weight"], None, h["lora_A"], h["lora_B"], t["scale"], SCALING, 0.0, seed, True)
