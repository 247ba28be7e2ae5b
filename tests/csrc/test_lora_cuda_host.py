"""lora_linear's CUDA dropout kernels (shrink, backward), run on the CPU, against torch.

What this proves, for ``csrc/cuda/lora_linear.cu`` in fp32, fp16 and bf16:

- the dropout mask of both kernels is, bit for bit, ``deltakern.reference.philox`` 's (the ground
  truth of every backend), which is also the CPU kernel's (``torch.ops.deltakern.dropout_keep_mask``),
  for rows of K % 4 != 0 elements (Philox counter groups straddling rows, row blocks and the shrink's
  256-column chunks) and p = 0.1, 0.5;
- the backward writes dx ← f · dx and x_dropped = f · x (f = keep ? 1 / (1 − p) : 0) with the bits
  of torch's fp32 formula rounded once, for every element and nothing outside the tensors, NaN and
  inf propagating (dropping multiplies by 0, it does not select 0);
- the shrink xa = drop(x) Aᵀ is within the fp32 accumulation bound of an fp64 reference (derived
  from K and the magnitudes of the terms, see ``shrink_bound``), plus half an ulp of the dtype,
  for M, K, R around its tiles (8 rows per block, 64 outputs per r tile, 256-column chunks), writes
  every element of xa and nothing outside it, and reads no staged value before it is written;
  through one-hot rows of A it also gives drop(x) exactly, so its mask is checked bit for bit too;
- both kernels grid-stride: grids smaller than the problem give the same result;
- the launchers' plans (``shrink_plan``, ``backward_plan``: grid, block size, static shared memory,
  vector-load instantiation, whether anything is launched) follow the rule mirrored here, and the
  runs use those plans rather than a restated dispatch; both instantiations (4-element aligned and
  not) are run.

How: the kernels are wrappers around ``__host__ __device__`` bodies that see blockIdx, gridDim and
threadIdx only through a ``column_sum::Lane``, and the shrink's ``__syncthreads`` and warp
shuffles only through a Sync. The harness ``lora_cuda_host.cu`` includes the very source the GPU
build compiles and runs the shrink body with one block of 256 OS threads (a ``std::barrier`` for
``__syncthreads``; the warp sum is the xor-shuffle butterfly evaluated on the 32 lanes' published
values, so the same fp32 additions in the same order as on the GPU), its shared memory NaN before
the launch with a guard after it; the backward body lane by lane. nvcc builds it once per session
with torch's nvcc flags (tests/csrc/nvcc.py). Inputs sit in NaN-guarded buffers (a read out of
bounds shows as NaN in an output), outputs start as NaN inside sentinel guards.

Not covered: what only a GPU shows (real scheduling and __syncthreads, the vector loads' alignment
faults, register pressure, launch limits), nor the device arithmetic: on the GPU nvcc contracts the
shrink's ``acc += a · x`` into one fma, which the bound allows for but the host build does not do,
so device bits may differ from these within that bound.
"""

import ctypes
import functools
import math
from pathlib import Path

import pytest
import torch

import deltakern  # noqa: F401  (registers torch.ops.deltakern)
from deltakern.reference.philox import dropout_keep_mask
from tests.csrc.nvcc import DTYPE_CODE, NVCC, build_harness
from tests.csrc.test_elementwise_cuda_host import (
    assert_bits_equal,
    assert_within,
    inp,
    out,
)

HARNESS = Path(__file__).resolve().with_name("lora_cuda_host.cu")

if NVCC is None:
    pytest.skip("nvcc not found", allow_module_level=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SEED = 0x5EED_1234_ABCD
U32 = 2.0**-24  # unit roundoff of fp32

# The kernels' constants (lora_linear.cu), mirrored to state the plans' rule.
SHRINK_THREADS = 256  # kShrinkThreads
SHRINK_ROWS = 8  # kShrinkRows: rows of x per block
SHRINK_R_TILE = 64  # kShrinkRTile: outputs r per block
SHRINK_CHUNK = 256  # kShrinkChunk: columns staged at a time
BACKWARD_THREADS = 256  # kBackwardThreads
MAX_GRID = 65535  # kMaxGridDim
WARP = 32

_I64, _INT, _PTR, _F32, _U64 = (
    ctypes.c_int64,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_float,
    ctypes.c_uint64,
)


@pytest.fixture(scope="session")
def lib(tmp_path_factory):
    so = tmp_path_factory.mktemp("lora_cuda_host") / "lora_cuda_host.so"
    lib = ctypes.CDLL(str(build_harness(HARNESS, so)))
    signatures = {
        "shrink_plan": ([_INT, _PTR, _I64, _I64, _I64, _PTR], None),
        "backward_plan": ([_INT, _PTR, _PTR, _PTR, _I64, _I64, _PTR], None),
        "shrink": (
            [_INT, _PTR, _PTR, _PTR, _I64, _I64, _I64, _F32, _F32, _U64, _I64, _I64],
            _INT,
        ),
        "backward": (
            [_INT, _PTR, _PTR, _PTR, _I64, _I64, _F32, _F32, _U64, _I64],
            _INT,
        ),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, f"dk_lora_host_{name}")
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def keep_scale(p: float) -> float:
    """1 / (1 − p) rounded to fp32, as lora_linear_cuda.cpp passes it."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


@functools.cache
def mask_factor(M: int, K: int, p: float, seed: int = SEED) -> torch.Tensor:
    """keep ? 1 / (1 − p) : 0 in fp32 over [M, K], from the reference Philox mask (cached: not to be
    modified)."""
    return dropout_keep_mask(seed, M, K, p).float() * keep_scale(p)


def plan(lib, name, *args):
    values = (ctypes.c_int64 * 6)()
    getattr(lib, f"dk_lora_host_{name}_plan")(*args, values)
    launch, grid_x, grid_y, threads, shared_bytes, vec = values
    return {
        "launch": bool(launch),
        "grid": (grid_x, grid_y),
        "threads": threads,
        "shared_bytes": shared_bytes,
        "vec": bool(vec),
    }


def assert_bits_equal_nan(actual: torch.Tensor, expected: torch.Tensor, name: str):
    """Bit for bit, except that a NaN may be any NaN: a NaN stored as bf16 is 0x7FFF from CUDA's
    __float2bfloat16_rn (host and device) and 0x7FC0 from torch's conversion."""
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{name}: NaN at other places than expected"
    assert_bits_equal(actual[~nan], expected[~nan], name)


def run_shrink(lib, dtype, x, A, xa, M, K, R, p, grid=(0, 0), seed=SEED):
    """The shrink over the launcher's plan (grid (0, 0)) or the given grid."""
    rc = lib.dk_lora_host_shrink(
        DTYPE_CODE[dtype],
        x.ptr(),
        A.ptr(),
        xa.ptr(),
        M,
        K,
        R,
        p,
        keep_scale(p),
        seed,
        *grid,
    )
    assert rc == 0, f"shrink returned {rc} (2: a block wrote past its shared memory)"


def run_backward(lib, dtype, x, dx, xd, M, K, p, grid_x=0, seed=SEED):
    rc = lib.dk_lora_host_backward(
        DTYPE_CODE[dtype],
        x.ptr(),
        dx.ptr(),
        xd.ptr(),
        M,
        K,
        p,
        keep_scale(p),
        seed,
        grid_x,
    )
    assert rc == 0, f"backward returned {rc}"


# ---------------------------------------------------------------------------------------
# Plans.


def aligned(ptr: int, dtype) -> bool:
    return ptr % (4 * torch.empty((), dtype=dtype).element_size()) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", [0, 2, 4])
@pytest.mark.parametrize(
    "M,K,R",
    [
        (1, 1, 1),
        (7, 13, 8),
        (8, 96, 64),
        (9, 257, 65),
        (129, 13, 16),
        (0, 5, 3),
        (5, 0, 3),
        (5, 3, 0),
        (8 * MAX_GRID + 1, 4, 64 * MAX_GRID + 1),
    ],
    ids=str,
)
def test_shrink_plan_is_the_rule(lib, dtype, lead, M, K, R):
    x = torch.empty(8, dtype=dtype)[lead:]
    got = plan(lib, "shrink", DTYPE_CODE[dtype], x.data_ptr(), M, K, R)
    assert got == {
        "launch": M > 0 and R > 0,  # K == 0 launches: the kernel writes the empty sums as zeros
        "grid": (
            min(-(-M // SHRINK_ROWS), MAX_GRID),
            min(-(-R // SHRINK_R_TILE), MAX_GRID),
        ),
        "threads": SHRINK_THREADS,
        "shared_bytes": 4 * SHRINK_ROWS * SHRINK_CHUNK,
        "vec": aligned(x.data_ptr(), dtype),
    }
    assert got["vec"] == (lead % 4 == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leads", [(4, 4, 4), (1, 0, 0), (0, 2, 0), (0, 0, 3)], ids=str)
@pytest.mark.parametrize(
    "M,K",
    [
        (1, 1),
        (7, 13),
        (129, 257),
        (1, 1024),
        (3, 1025),
        (0, 4),
        (4, 0),
        (MAX_GRID, 4 * BACKWARD_THREADS + 1),
    ],
    ids=str,
)
def test_backward_plan_is_the_rule(lib, dtype, leads, M, K):
    base = torch.empty(8, dtype=dtype)
    ptrs = [base[lead:].data_ptr() for lead in leads]
    got = plan(lib, "backward", DTYPE_CODE[dtype], *ptrs, M, K)
    groups = -(-(M * K) // 4)
    assert got == {
        "launch": M * K > 0,
        "grid": (min(-(-groups // BACKWARD_THREADS), MAX_GRID), 1),
        "threads": BACKWARD_THREADS,
        "shared_bytes": 0,
        "vec": all(aligned(p, dtype) for p in ptrs),  # x, dx_lowrank and x_dropped all vector-accessed
    }


# ---------------------------------------------------------------------------------------
# Dropout backward (and the mask, bit for bit).

BACKWARD_SHAPES = [
    (1, 1),
    (1, 3),
    (7, 13),
    (7, 96),
    (129, 257),
    (3, 1025),
]  # K % 4 != 0: groups straddle rows


def specials(t: torch.Tensor) -> torch.Tensor:
    """t with NaN, inf and −inf at a few places (they must reach the outputs, kept or dropped)."""
    t = t.clone()
    flat = t.view(-1)
    for i, v in zip(
        (0, flat.numel() // 2, flat.numel() - 1),
        (float("nan"), float("inf"), float("-inf")),
    ):
        flat[i] = v
    return t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K", BACKWARD_SHAPES, ids=str)
@pytest.mark.parametrize("p,lead", [(0.1, 0), (0.5, 1)], ids=["p0.1-vec", "p0.5-scalar"])
def test_dropout_backward(lib, dtype, M, K, p, lead):
    """dx ← f · dx in place and x_dropped = f · x, bit for bit with torch's fp32 formula rounded once;
    the kernel's mask (x_dropped ≠ 0 where x ≠ 0) is the reference's and the CPU kernel's. Both
    instantiations: the tensors 4-element aligned (vector accesses) or one element off."""
    g = torch.Generator().manual_seed(M * 10007 + K)
    x_values = torch.randn(M, K, generator=g).to(dtype)
    x_values[x_values == 0] = 1.0  # a nonzero x shows the mask in x_dropped
    x = inp(specials(x_values) if M * K >= 3 else x_values, lead)
    dx = inp(specials(torch.randn(M, K, generator=g).to(dtype)).flip(-1).contiguous(), lead)
    xd = out((M, K), dtype, lead)
    dx_before = dx.t.clone()
    run_backward(lib, dtype, x, dx, xd, M, K, p)
    f = mask_factor(M, K, p)
    assert_bits_equal_nan(xd.t, (x.t.float() * f).to(dtype), "x_dropped")
    assert_bits_equal_nan(dx.t, (dx_before.float() * f).to(dtype), "dx_lowrank")
    finite = x.t.isfinite()
    kernel_mask = xd.t != 0
    reference_mask = f != 0
    assert torch.equal(kernel_mask[finite], reference_mask[finite])
    assert torch.equal(reference_mask, torch.ops.deltakern.dropout_keep_mask(M, K, p, SEED))
    for name, buf in {"x": x, "dx_lowrank": dx, "x_dropped": xd}.items():
        buf.assert_guard_intact(name)


@pytest.mark.parametrize("grid_x", [1, 2])
def test_dropout_backward_grid_stride(lib, grid_x):
    """More counter groups than the grid's lanes (the plan's grid is 6 blocks)."""
    M, K, p = 9, 601, 0.3
    assert plan(lib, "backward", 0, 0, 0, 0, M, K)["grid"] == (6, 1)
    x = inp(torch.randn(M, K))
    dx = inp(torch.randn(M, K))
    xd = out((M, K), torch.float32)
    dx_before = dx.t.clone()
    run_backward(lib, torch.float32, x, dx, xd, M, K, p, grid_x=grid_x)
    f = mask_factor(M, K, p)
    assert_bits_equal(xd.t, x.t * f, "x_dropped")
    assert_bits_equal(dx.t, dx_before * f, "dx_lowrank")
    for name, buf in {"x": x, "dx_lowrank": dx, "x_dropped": xd}.items():
        buf.assert_guard_intact(name)


def test_empty_and_unknown_dtype(lib):
    """M·K == 0 (backward) or M·R == 0 (shrink) runs nothing, as the launchers; an unknown dtype is refused."""
    x, dx, xd = inp(torch.ones(2, 3)), inp(torch.ones(2, 3)), out((2, 3), torch.float32)
    for M, K in ((0, 3), (2, 0)):
        run_backward(lib, torch.float32, x, dx, xd, M, K, 0.5)
    assert torch.equal(dx.t, torch.ones(2, 3)) and bool(xd.t.isnan().all())
    A, xa = inp(torch.ones(3, 3)), out((2, 3), torch.float32)
    for M, R in ((0, 3), (2, 0)):
        run_shrink(lib, torch.float32, x, A, xa, M, 3, R, 0.5)
    assert bool(xa.t.isnan().all())
    assert lib.dk_lora_host_backward(7, x.ptr(), dx.ptr(), xd.ptr(), 2, 3, 0.5, 2.0, SEED, 0) == 1
    assert lib.dk_lora_host_shrink(7, x.ptr(), A.ptr(), xa.ptr(), 2, 3, 3, 0.5, 2.0, SEED, 0, 0) == 1
    for name, buf in {"x": x, "dx": dx, "xd": xd, "A": A, "xa": xa}.items():
        buf.assert_guard_intact(name)


# ---------------------------------------------------------------------------------------
# Shrink.


def shrink_reference(x: torch.Tensor, A: torch.Tensor, f: torch.Tensor):
    """xa = (x ⊙ f) Aᵀ in fp64, and the bound on the fp32 evaluation's error.

    Each term a·x·f is rounded twice (x·f to fp32 when staged, the product or the fma), then added
    into lane k % 32's running sum, which over all chunks holds ⌈K / 32⌉ terms, then through the
    warp's 5-level butterfly: at most n = ⌈K / 32⌉ + 7 roundings touch any term, so the fp32 result
    errs by at most γₙ · Σ|a·x·f| with γₙ = n·u / (1 − n·u), u = 2⁻²⁴ (Higham, Lemma 3.1 and
    (3.5), any summation order; an fma only removes roundings)."""
    K = x.shape[1]
    xd = x.double() * f.double()
    ref = xd @ A.double().T
    n = math.ceil(K / WARP) + 7
    gamma = n * U32 / (1 - n * U32)
    return ref, gamma * (xd.abs() @ A.double().abs().T)


# (M, K, R): rows around the 8-row blocks, K around the 32-lane stride and the 256-column chunk
# (and K % 4 != 0), R around the 8 warps × 8 outputs of an r tile, incl. two tiles.
# (Each emulated warp sum is a barrier of 32 OS threads: M = 129 is run with small R to stay fast.)
SHRINK_CASES = [
    (1, 1, 1),
    (7, 13, 8),
    (1, 257, 64),
    (7, 96, 64),
    (9, 257, 1),
    (129, 13, 16),
    (129, 96, 8),
    (7, 600, 72),
    (17, 257, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,R", SHRINK_CASES, ids=str)
def test_shrink_against_fp64(lib, dtype, M, K, R):
    # p = 0.1 or 0.5 by the parity of (case, dtype): every shape sees both over the dtypes, every
    # dtype both over the shapes (each shape with each p: tests below and the backward's masks).
    p = (0.1, 0.5)[(SHRINK_CASES.index((M, K, R)) + DTYPES.index(dtype)) % 2]
    g = torch.Generator().manual_seed(M * 7919 + K * 31 + R)
    lead = 1 if (M + K) % 2 else 0  # both instantiations: x 4-element aligned or not
    x = inp(torch.randn(M, K, generator=g).to(dtype), lead)
    A = inp((torch.randn(R, K, generator=g) / math.sqrt(K)).to(dtype))
    xa = out((M, R), dtype)
    assert plan(lib, "shrink", DTYPE_CODE[dtype], x.ptr(), M, K, R)["vec"] == (lead == 0)
    run_shrink(lib, dtype, x, A, xa, M, K, R, p)
    ref, err32 = shrink_reference(x.t, A.t, mask_factor(M, K, p))
    assert_within(xa.t, ref, err32, "xa")
    for name, buf in {"x": x, "A": A, "xa": xa}.items():
        buf.assert_guard_intact(name)


def test_shrink_bound_bites(lib):
    """The bound is tight enough to see a mask one Philox lane off, or another seed's mask."""
    M, K, R, p = 7, 257, 16, 0.1
    x, A, xa = (
        inp(torch.randn(M, K)),
        inp(torch.randn(R, K) / math.sqrt(K)),
        out((M, R), torch.float32),
    )
    run_shrink(lib, torch.float32, x, A, xa, M, K, R, p)
    f = mask_factor(M, K, p)
    shifted = f.view(-1).roll(1).view(M, K)
    for wrong in (shifted, mask_factor(M, K, p, seed=SEED + 1)):
        with pytest.raises(AssertionError):
            assert_within(xa.t, *shrink_reference(x.t, A.t, wrong), "xa")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K", [(7, 13), (9, 257)], ids=str)
def test_shrink_mask_bit_for_bit(lib, dtype, M, K):
    """With A's rows one-hot, xa[:, r] is drop(x)[:, k_r] exactly (the other terms are ±0): the
    shrink's staged mask and scaling, bit for bit, over every column (chunk edge 256 included)."""
    p, R = 0.5, 64
    x_values = torch.randn(M, K).to(dtype)
    x_values[x_values == 0] = 1.0
    x = inp(x_values)
    f = mask_factor(M, K, p)
    for start in range(0, K, R):
        cols = torch.arange(start, min(start + R, K))
        A = inp(torch.nn.functional.one_hot(cols, K).to(dtype))
        xa = out((M, len(cols)), dtype)
        run_shrink(lib, dtype, x, A, xa, M, K, len(cols), p)
        kept = (x.t.float() * f).to(dtype)[:, cols]
        assert_bits_equal(xa.t, torch.where(kept == 0, torch.zeros_like(kept), kept), "xa")  # +0 + (−0) is +0
        A.assert_guard_intact("A")
        xa.assert_guard_intact("xa")


def test_shrink_propagates_nan_and_inf(lib):
    """A NaN or inf of x reaches every output of its row, dropped or kept (0 · NaN is NaN), and no other."""
    M, K, R, p = 9, 37, 8, 0.5
    x_values = torch.randn(M, K)
    keep = dropout_keep_mask(SEED, M, K, p)
    dropped_at = int((~keep[2]).nonzero()[0])
    kept_at = int(keep[5].nonzero()[0])
    x_values[2, dropped_at] = float("nan")
    x_values[5, kept_at] = float("inf")
    x, A, xa = (
        inp(x_values),
        inp(torch.rand(R, K) + 0.5),
        out((M, R), torch.float32),
    )  # A > 0: inf stays inf
    run_shrink(lib, torch.float32, x, A, xa, M, K, R, p)
    assert bool(xa.t[2].isnan().all()) and bool((xa.t[5] == float("inf")).all())
    others = [m for m in range(M) if m not in (2, 5)]
    assert bool(xa.t[others].isfinite().all())


@pytest.mark.parametrize("grid", [(1, 1), (3, 2)], ids=str)
def test_shrink_grid_stride(lib, grid):
    """Fewer blocks than (row blocks, r tiles) = (5, 2): every block strides over both; the same bits
    as the plan's grid."""
    M, K, R, p = 37, 45, 72, 0.1
    x, A = inp(torch.randn(M, K)), inp(torch.randn(R, K) / 10)
    full, strided = out((M, R), torch.float32), out((M, R), torch.float32)
    assert plan(lib, "shrink", 0, x.ptr(), M, K, R)["grid"] == (5, 2)
    run_shrink(lib, torch.float32, x, A, full, M, K, R, p)
    run_shrink(lib, torch.float32, x, A, strided, M, K, R, p, grid=grid)
    assert_bits_equal(strided.t, full.t, "xa")
    strided.assert_guard_intact("xa")
    assert_within(strided.t, *shrink_reference(x.t, A.t, mask_factor(M, K, p)), "xa")


def test_shrink_empty_k_writes_zeros(lib):
    """K == 0: the plan launches (the glue zeroes xa itself, but the kernel would write the empty sums)."""
    x, A, xa = inp(torch.ones(1, 1)), inp(torch.ones(1, 1)), out((5, 3), torch.float32)
    run_shrink(lib, torch.float32, x, A, xa, 5, 0, 3, 0.5)
    assert_bits_equal(xa.t, torch.zeros(5, 3), "xa")
    xa.assert_guard_intact("xa")
