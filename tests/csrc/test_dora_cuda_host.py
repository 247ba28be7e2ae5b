"""The element-wise CUDA kernels of dora_linear, run on the CPU, against torch.

What this proves: the index math, grid-striding, counter groups and column sums of
``csrc/cuda/dora_linear.cu`` (scale columns: y = (c − shift) ⊙ z + b, in place too; scale grad:
g ⊙ (c − shift) with the per-row-group fp32 partials of g ⊙ z; drop rows: a row block of
x̃ = drop(x) numbered as in the whole x; mask accumulate: dx += mask ⊙ t / (1 − p), t = x̃) write
every element of every output and nothing outside it, with the value torch gives for the same fp32
formula rounded once to fp32, fp16 or bf16 (bit for bit) and the dropout mask of
``deltakern.reference.philox`` (the ground truth of every backend); for shapes around the 256-lane
blocks, 32-column tiles and 64-row groups, rows of K % 4 != 0 elements (counter groups straddling
rows and row blocks) and grids smaller than the problem.

How: as tests/csrc/test_elementwise_cuda_host.py (whose guarded buffers and partial-sum check
this reuses): the harness ``dora_cuda_host.cu`` includes the very source the GPU build compiles
and runs its ``__host__ __device__`` bodies with explicit lanes, the column sums with one block of
256 OS threads and a ``std::barrier`` for ``__syncthreads``; nvcc builds it once per session.

Not covered: what only a GPU shows (real scheduling and __syncthreads, launch configuration),
nor the device arithmetic (nvcc contracts (c − shift) · z + b into one fma on the GPU, so device
results may differ from these by an fp32 ulp before the rounding to the dtype).
"""

import ctypes
from pathlib import Path

import pytest
import torch

from deltakern.reference.philox import dropout_keep_mask
from tests.csrc.nvcc import DTYPE_CODE, NVCC, build_harness
from tests.csrc.test_elementwise_cuda_host import (
    EPS32,
    MAX_BLOCKS,
    THREADS,
    assert_bits_equal,
    assert_partial,
    inp,
    out,
)
from tests.csrc.test_elementwise_cuda_host import row_groups as row_groups_rule

HARNESS = Path(__file__).resolve().with_name("dora_cuda_host.cu")

if NVCC is None:
    pytest.skip("nvcc not found", allow_module_level=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SEED = 20240607

_I64, _INT, _PTR, _F32, _U64 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float, ctypes.c_uint64


@pytest.fixture(scope="session")
def lib(tmp_path_factory):
    so = tmp_path_factory.mktemp("dora_cuda_host") / "dora_cuda_host.so"
    lib = ctypes.CDLL(str(build_harness(HARNESS, so)))
    signatures = {
        "rows_geometry": ([_I64, _I64, _PTR], None),
        "column_grid": ([_I64, _I64, _PTR], None),
        "group_range": ([_I64, _I64, _PTR], None),
        "scale_columns": ([_INT, _PTR, _PTR, _F32, _PTR, _PTR, _I64, _I64, _I64, _I64], _INT),
        "scale_grad": ([_INT, _PTR, _PTR, _PTR, _F32, _PTR, _PTR, _I64, _I64, _I64, _I64], _INT),
        "drop_rows": ([_INT, _PTR, _PTR, _I64, _I64, _I64, _F32, _F32, _U64, _I64], _INT),
        "mask_accumulate": ([_INT, _PTR, _PTR, _PTR, _I64, _I64, _F32, _F32, _U64, _I64], _INT),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, f"dk_dora_host_{name}")
        fn.argtypes, fn.restype = argtypes, restype
    return lib


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def call(lib, name, *args):
    assert getattr(lib, f"dk_dora_host_{name}")(*args) == 0, f"{name} rejected its arguments"


def geometry(lib, name, *sizes, n_out=2):
    values = (ctypes.c_int64 * n_out)()
    getattr(lib, f"dk_dora_host_{name}")(*sizes, values)
    return tuple(values)


def keep_scale(p: float) -> float:
    """1 / (1 − p) rounded to fp32, as the glue passes it."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def scale_vector(n: int) -> torch.Tensor:
    """fp32 scales around 1, never exactly 1."""
    return (1.0 + 0.3 * (2 * torch.rand(n) - 1)).float()


# ---------------------------------------------------------------------------------------
# Geometry.


def test_rows_geometry(lib):
    """Column blocks of 256 lanes by rows, each capped at kMaxBlocks."""
    for M, N in [(1, 1), (3, 256), (3, 257), (70000, 300), (5, 2**30)]:
        assert geometry(lib, "rows_geometry", M, N) == (min(-(-N // THREADS), MAX_BLOCKS), min(M, MAX_BLOCKS))


@pytest.mark.parametrize("begin,end", [(0, 1), (0, 4), (3, 9), (4, 8), (13 * 5, 13 * 9), (0, 10**9 + 3),
                                       (7, 7 + 4 * 256 * MAX_BLOCKS)])
def test_group_range(lib, begin, end):
    """The counter groups cover [begin, end) and nothing else; one lane each, up to kMaxBlocks."""
    first, last, grid_x, grid_y = geometry(lib, "group_range", begin, end, n_out=4)
    assert (first, last) == (begin // 4, -(-end // 4))
    assert grid_y == 1 and grid_x == min(-(-(last - first) // THREADS), MAX_BLOCKS)


# ---------------------------------------------------------------------------------------
# Scale columns and scale grad.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N", [(1, 1), (3, 255), (2, 256), (5, 257), (70, 600)], ids=str)
@pytest.mark.parametrize("shift,bias,in_place",
                         [(0.0, True, False), (1.0, True, True), (1.0, False, False), (0.0, False, True)])
def test_scale_columns(lib, dtype, M, N, shift, bias, in_place):
    """y = (c − shift) ⊙ z + b, bit for bit, also written over z (the forward's in-place epilogue)."""
    z = inp(torch.randn(M, N).to(dtype))
    z_values = z.t.clone()
    scale = inp(scale_vector(N))
    b = inp(torch.randn(N).to(dtype)) if bias else None
    y = z if in_place else out((M, N), dtype)
    grid = geometry(lib, "rows_geometry", M, N)
    call(lib, "scale_columns", DTYPE_CODE[dtype], z.ptr(), scale.ptr(), shift, b.ptr() if bias else None, y.ptr(),
         M, N, *grid)
    expected = (scale.t - shift) * z_values.float()
    if bias:
        expected = expected + b.t.float()
    assert_bits_equal(y.t, expected.to(dtype), "y")
    for name, t in {"z": z, "scale": scale, "y": y, **({"b": b} if bias else {})}.items():
        t.assert_guard_intact(name)


@pytest.mark.parametrize("grid", [(1, 1), (2, 3)], ids=str)
def test_scale_columns_grid_stride(lib, grid):
    """More rows and columns than the grid has lanes: the body grid-strides over both."""
    M, N = 7, 3 * THREADS + 5
    z = inp(torch.randn(M, N))
    scale = inp(scale_vector(N))
    y = out((M, N), torch.float32)
    call(lib, "scale_columns", DTYPE_CODE[torch.float32], z.ptr(), scale.ptr(), 1.0, None, y.ptr(), M, N, *grid)
    assert_bits_equal(y.t, (scale.t - 1.0) * z.t, "y")
    y.assert_guard_intact("y")


def run_scale_grad(lib, dtype, M, N, shift, grid=None):
    g = inp(torch.randn(M, N).to(dtype))
    z = inp(torch.randn(M, N).to(dtype))
    scale = inp(scale_vector(N))
    gs = out((M, N), dtype)
    partial = out((row_groups_rule(M), N), torch.float32)
    grid = grid or geometry(lib, "column_grid", M, N)
    call(lib, "scale_grad", DTYPE_CODE[dtype], g.ptr(), z.ptr(), scale.ptr(), shift, gs.ptr(), partial.ptr(), M, N,
         *grid)
    assert_bits_equal(gs.t, (g.t.float() * (scale.t - shift)).to(dtype), "g_scaled")
    terms = g.t.double() * z.t.double()
    assert_partial(partial.t, terms, 0.5 * EPS32 * terms.abs(), "partial")
    for name, t in {"g": g, "z": z, "scale": scale, "g_scaled": gs, "partial": partial}.items():
        t.assert_guard_intact(name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N", [(1, 1), (63, 31), (64, 32), (65, 33), (300, 70)], ids=str)
@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_scale_grad(lib, dtype, M, N, shift):
    """g ⊙ (c − shift) bit for bit, and per-group fp32 sums of g ⊙ z (on launch_column_sum's grid,
    column_geometry's, which tests/csrc/test_elementwise_cuda_host.py checks against the rule)."""
    run_scale_grad(lib, dtype, M, N, shift)


def test_scale_grad_grid_stride(lib):
    run_scale_grad(lib, torch.float32, 200, 70, 1.0, grid=(1, 2))


# ---------------------------------------------------------------------------------------
# The dropout kernels.


def mask_factor(M: int, K: int, p: float) -> torch.Tensor:
    """keep · 1 / (1 − p) in fp32 for the whole [M, K]: the reference Philox mask."""
    return dropout_keep_mask(SEED, M, K, p).float() * keep_scale(p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,row0,rows", [(1, 1, 0, 1), (9, 13, 0, 9), (9, 13, 3, 4), (9, 13, 8, 1), (40, 130, 7, 30),
                                           (5, 257, 1, 3), (3, 1024, 1, 2)], ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rows(lib, dtype, M, K, row0, rows, p):
    """Rows row0 .. row0 + rows − 1 of x̃, numbered as elements of the whole x: block boundaries that
    split a counter group take their own elements of it."""
    x = inp(torch.randn(M, K).to(dtype))
    dropped = out((rows, K), dtype)
    _, _, grid_x, _ = geometry(lib, "group_range", row0 * K, (row0 + rows) * K, n_out=4)
    call(lib, "drop_rows", DTYPE_CODE[dtype], x.ptr(), dropped.ptr(), row0, rows, K, p, keep_scale(p), SEED, grid_x)
    expected = (x.t.float() * mask_factor(M, K, p))[row0:row0 + rows].to(dtype)
    assert_bits_equal(dropped.t, expected, "x_dropped")
    x.assert_guard_intact("x")
    dropped.assert_guard_intact("x_dropped")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K", [(1, 1), (1, 3), (9, 13), (40, 130), (3, 1024), (2, 600)], ids=str)
@pytest.mark.parametrize("p", [0.1, 0.7])
def test_mask_accumulate(lib, dtype, M, K, p):
    """dx + mask ⊙ t / (1 − p) and t ← x̃, bit for bit."""
    x = inp(torch.randn(M, K).to(dtype))
    t = inp(torch.randn(M, K).to(dtype))
    dx = inp(torch.randn(M, K).to(dtype))
    t_values, dx_values = t.t.clone(), dx.t.clone()
    _, _, grid_x, _ = geometry(lib, "group_range", 0, M * K, n_out=4)
    call(lib, "mask_accumulate", DTYPE_CODE[dtype], x.ptr(), t.ptr(), dx.ptr(), M, K, p, keep_scale(p), SEED, grid_x)
    f = mask_factor(M, K, p)
    assert_bits_equal(dx.t, (dx_values.float() + f * t_values.float()).to(dtype), "dx")
    assert_bits_equal(t.t, (f * x.t.float()).to(dtype), "t")
    for name, g in {"x": x, "t": t, "dx": dx}.items():
        g.assert_guard_intact(name)


@pytest.mark.parametrize("grid_x", [1, 3])
def test_dropout_kernels_grid_stride(lib, grid_x):
    """More counter groups than lanes: both kernels grid-stride over them."""
    M, K, p = 11, 3 * THREADS + 7, 0.3
    x = inp(torch.randn(M, K))
    dropped = out((M - 2, K), torch.float32)
    call(lib, "drop_rows", DTYPE_CODE[torch.float32], x.ptr(), dropped.ptr(), 2, M - 2, K, p, keep_scale(p), SEED,
         grid_x)
    assert_bits_equal(dropped.t, (x.t * mask_factor(M, K, p))[2:], "x_dropped")
    t = inp(torch.randn(M, K))
    dx = inp(torch.zeros(M, K))
    t_values = t.t.clone()
    call(lib, "mask_accumulate", DTYPE_CODE[torch.float32], x.ptr(), t.ptr(), dx.ptr(), M, K, p, keep_scale(p), SEED,
         grid_x)
    assert_bits_equal(dx.t, 0.0 + mask_factor(M, K, p) * t_values, "dx")  # 0 + (-0) is +0
    for name, g in {"x": x, "dropped": dropped, "t": t, "dx": dx}.items():
        g.assert_guard_intact(name)
