"""The element-wise CUDA kernels of adapter and ia3_linear, run on the CPU, against torch.

What this proves: the index math, grid-striding, row groups and column tiles of
``csrc/cuda/adapter.cu`` (init, activation, the dpre and grad_out column sums) and
``csrc/cuda/ia3_linear.cu`` (the scale in packs of 1 and 4, per column and per row; the input-
and output-scale gradients) write every element of every output and nothing outside them, with
the value torch gives for the same fp32 formula rounded once to fp32, fp16 or bf16; and that the
fp32 partial column sums are, group by group, the sums over the rows of row_groups.h's groups,
for shapes at and around the 32-column tiles and the 64-row groups, grids smaller than the
problem, a group of more than 64 rows, and fp32 in place (dz is dpre, g is dx).

How: the kernels are wrappers around ``__host__ __device__`` bodies that see blockIdx, gridDim
and threadIdx only through a ``column_sum::Lane``. The harness ``elementwise_cuda_host.cu``
includes the very sources the GPU build compiles and runs those bodies with explicit lanes: the
column sums (``column_sum_body`` with every op) with one block of 256 OS threads whose
``__syncthreads`` is a ``std::barrier``, blocks one after another; the sync-free bodies lane by
lane. nvcc builds it once per session with torch's nvcc flags (tests/csrc/nvcc.py), for one
device arch; it is loaded with ctypes and called on CPU tensors. Every output starts as NaN, so
an element the kernels fail to write fails the test, and every tensor sits in a buffer with a
guard around it (outputs: a sentinel; inputs: NaN, so a read out of bounds shows as NaN in an
output) whose bits must not change. The launch geometry is the launchers' own
(``column_geometry``, ``init_geometry``, ...; exported by the harness and checked against the
rule mirrored here) unless a test passes a smaller grid.

Element outputs that involve no transcendental function are compared bit for bit with torch
(``(g * s.float()).to(dtype)`` and the like). The activations (gelu, gelu_tanh, silu, tanh) are
not bit-exact: the host build calls glibc's erff / expf / tanhf and torch its own vectorized
ones, which differ in the last bit for some inputs (the same fp32 formula in torch: 14% of
tanh's, 2% of gelu's, 0.5% of silu's results on 10⁵ inputs of 3 · randn); they are compared
with the fp64 reference activations (``deltakern.reference.adapter``) within 4 fp32 ulps of the
formula's terms plus the final rounding to fp16 / bf16 (relu is bit-exact). M = 0 or a width of 0 is not run: the launchers
return before launching.

Not covered: what only a GPU shows (real warp scheduling and __syncthreads, the vectorized pack
loads and their alignment faults, register pressure, launch configuration), nor the device
arithmetic: on the GPU nvcc contracts ``residual + s · b_up`` into one fma and CUDA's expf, erff
and tanhf are not glibc's, so device results may differ from these by an fp32 ulp before the
rounding to the dtype. A read out of bounds whose value reaches no output (say a per-column
value loaded for a column past the end, which the kernel guards with j < cols) is not seen, and
neither is work done twice with the same result (a block redoing another's tile).
"""

import ctypes
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from deltakern.activations import ACTIVATIONS, activation_fn
from tests.csrc.nvcc import DTYPE_CODE, NVCC, build_harness

HARNESS = Path(__file__).resolve().with_name("elementwise_cuda_host.cu")

if NVCC is None:
    pytest.skip("nvcc not found", allow_module_level=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
THREADS = 256  # column_sum::kThreads
COL_TILE = 32  # column_sum::kColTile
MAX_BLOCKS = 65535  # column_sum::kMaxBlocks
PACK = 4  # ia3_kernels::kPack
EPS32 = 2.0**-23
SCALE = 0.37  # not a power of two, so every product with it rounds
# Relative to the sum of |terms|: a group's fp32 sum here adds at most 9 terms per lane (65 rows,
# the most these tests put in a group, over 8 lanes) and then the 8 lanes, so its rounding error
# is below 17 ulps, 2e-6.
SUM_RTOL = 1e-5
# The fp32 evaluation of an activation or its derivative errs by a few ulps of its largest term,
# below 1 + |x| in each formula of activations.h (x Φ(x), Φ(x) + x φ(x), ...): bound it by 4 ulps
# of |result| + 1 + |x| (measured: at most 1.2 ulps on 21000 inputs of 3 · randn).
ACT_ULPS = 4


def group_rows(M: int) -> int:
    """row_groups.h's column_sum_group_rows: M over at most 256 groups of at least 64 rows."""
    return max(-(-M // 256), 64)


def row_groups(M: int) -> int:
    """row_groups.h's column_sum_row_groups: the rows of partial."""
    return -(-M // group_rows(M))


_I64, _INT, _PTR, _F32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
_GRID = [_I64, _I64]


@pytest.fixture(scope="session")
def lib(tmp_path_factory):
    so = tmp_path_factory.mktemp("elementwise_cuda_host") / "elementwise_cuda_host.so"
    lib = ctypes.CDLL(str(build_harness(HARNESS, so)))
    signatures = {
        "column_geometry": ([_I64, _I64, _PTR], None),
        "row_groups": ([_I64], _I64),
        "adapter_init_geometry": ([_I64, _I64, _PTR], None),
        "adapter_flat_geometry": ([_I64, _PTR], None),
        "ia3_scale_geometry": ([_I64, _I64, _PTR], None),
        "ia3_pack_aligned": ([_PTR, _INT], _INT),
        "adapter_dpre": ([_INT, _INT, _PTR, _PTR, _PTR, _PTR, _F32, _PTR, _I64, _I64, *_GRID], _INT),
        "adapter_colsum": ([_INT, _PTR, _PTR, _PTR, _I64, _I64, *_GRID], _INT),
        "ia3_input_grad": ([_INT, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, *_GRID], _INT),
        "ia3_output_grad": ([_INT, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, *_GRID], _INT),
        "adapter_init": ([_INT, _PTR, _PTR, _PTR, _I64, _I64, _F32, *_GRID], _INT),
        "adapter_activation": ([_INT, _INT, _PTR, _PTR, _I64, *_GRID], _INT),
        "ia3_scale": ([_INT, _INT, _INT, _PTR, _PTR, _PTR, _I64, _I64, *_GRID], _INT),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, f"dk_ew_host_{name}")
        fn.argtypes, fn.restype = argtypes, restype
    return lib


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def call(lib, name, *args):
    assert getattr(lib, f"dk_ew_host_{name}")(*args) == 0, f"{name} rejected its arguments"


def geometry(lib, name, *sizes, n_out=2):
    """One of the harness's exported launch geometries, as a tuple."""
    values = (ctypes.c_int64 * n_out)()
    getattr(lib, f"dk_ew_host_{name}")(*sizes, values)
    return tuple(values)


def column_grid(lib, M, cols):
    """launch_column_sum's grid."""
    return geometry(lib, "column_geometry", M, cols, n_out=5)[3:]


# ---------------------------------------------------------------------------------------
# Guarded tensors and comparisons.


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


class Guarded:
    """A contiguous tensor inside a larger buffer: `lead` elements before it, and after it one of
    its rows but at least 64 elements (more than a column tile), all set to `guard` and checked
    bit for bit by assert_guard_intact."""

    def __init__(self, values: torch.Tensor, guard: float, lead: int = 0):
        n = values.numel()
        tail = max(64, values.shape[-1])
        self.buffer = torch.full((lead + n + tail,), guard, dtype=values.dtype)
        self.t = self.buffer[lead : lead + n].view(values.shape)
        self.t.copy_(values)
        self.outside = torch.ones(self.buffer.shape, dtype=torch.bool)
        self.outside[lead : lead + n] = False
        self.guard_bits = bits(self.buffer)[self.outside].clone()

    def ptr(self) -> int:
        return self.t.data_ptr()

    def assert_guard_intact(self, name: str):
        changed = (bits(self.buffer)[self.outside] != self.guard_bits).sum().item()
        assert changed == 0, f"{name}: {changed} elements outside the tensor were written"


def inp(values: torch.Tensor, lead: int = 0) -> Guarded:
    """An input: NaN around it, so a read out of bounds turns an output into NaN."""
    return Guarded(values, float("nan"), lead)


def out(shape, dtype, lead: int = 0) -> Guarded:
    """An output: NaN, so an element left unwritten fails its comparison; a sentinel around it."""
    return Guarded(torch.full(shape, float("nan"), dtype=dtype), 77.0, lead)


def ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of t's dtype at each element of t, in fp64 (subnormal spacing below the
    smallest normal)."""
    info = torch.finfo(t.dtype)
    mantissa_bits, emin = -round(math.log2(info.eps)), round(math.log2(info.tiny))
    _, exponent = torch.frexp(t.double())  # t = m · 2^exponent, 0.5 <= |m| < 1
    binade = torch.where(t == 0, emin, exponent - 1).clamp(min=emin)
    return torch.exp2((binade - mantissa_bits).double())


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, name: str):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    wrong = (bits(actual) != bits(expected)).sum().item()
    assert wrong == 0, f"{name}: {wrong} of {actual.numel()} elements differ (NaN: {actual.isnan().sum().item()})"


def assert_within(actual: torch.Tensor, ref64: torch.Tensor, err32: torch.Tensor, name: str):
    """actual (the fp32 value rounded to actual's dtype once) against the fp64 ref: within err32
    (the fp32 evaluation), plus half an ulp of the dtype for fp16 / bf16. NaN fails."""
    bound = err32 if actual.dtype == torch.float32 else err32 + 0.5 * ulp(actual)
    err = (actual.double() - ref64).abs()
    bad = int((~(err <= bound)).sum())
    assert bad == 0, (
        f"{name}: {bad} of {actual.numel()} elements out of bounds "
        f"(NaN: {int(actual.isnan().sum())}, worst error / bound {(err / bound)[~err.isnan()].max().item():.3g})"
    )


def assert_partial(partial: torch.Tensor, terms: torch.Tensor, term_err: torch.Tensor, name: str):
    """partial [row_groups(M), cols]: group g's fp32 sum of the fp64 terms [M, cols] over its rows
    g · group_rows(M) .. (g + 1) · group_rows(M) - 1, and the sum over the groups against the
    fp64 total; within SUM_RTOL of the sum of |terms| plus the terms' own error bounds."""
    M, cols = terms.shape
    assert partial.shape == (row_groups(M), cols), f"{name}: partial {tuple(partial.shape)}"
    groups, rows = row_groups(M), group_rows(M)

    def per_group(t):  # the rows of each group summed in fp64 (zero rows pad the last group)
        padded = torch.zeros(groups * rows, cols, dtype=torch.float64)
        padded[:M] = t
        return padded.view(groups, rows, cols).sum(1)

    for actual, expected, bound in (
        (partial.double(), per_group(terms), SUM_RTOL * per_group(terms.abs()) + per_group(term_err)),
        (partial.double().sum(0), terms.sum(0), SUM_RTOL * terms.abs().sum(0) + term_err.sum(0)),
    ):
        bad = int((~((actual - expected).abs() <= bound)).sum())
        assert bad == 0, f"{name}: {bad} sums out of bounds (NaN: {int(actual.isnan().sum())})"


# ---------------------------------------------------------------------------------------
# The column-sum ops: each runs one op through column_sum_body and says what to expect.


@dataclass
class Run:
    """One column-sum launch: its outputs and what each must be."""

    partial: Guarded
    terms: torch.Tensor  # fp64 [M, cols]: each element's term of its column sum
    term_err: torch.Tensor  # fp64 [M, cols]: bound on the fp32 term's error
    exact: dict = field(default_factory=dict)  # name -> (output, expected bits)
    close: dict = field(default_factory=dict)  # name -> (output, fp64 reference, fp32 error bound)
    guarded: dict = field(default_factory=dict)  # name -> every Guarded tensor of the launch

    def outputs(self) -> dict:
        values = {name: t.t for name, (t, *_) in {**self.exact, **self.close}.items()}
        return {**values, "partial": self.partial.t}

    def check(self, name: str):
        for tensor_name, (t, expected) in self.exact.items():
            assert_bits_equal(t.t, expected, f"{name} {tensor_name}")
        for tensor_name, (t, ref, err) in self.close.items():
            assert_within(t.t, ref, err, f"{name} {tensor_name}")
        assert_partial(self.partial.t, self.terms, self.term_err, f"{name} partial")
        for tensor_name, t in self.guarded.items():
            t.assert_guard_intact(f"{name} {tensor_name}")


def activation_input(shape, dtype) -> torch.Tensor:
    """3 · randn, into the saturating tails, with every 5th element exactly 0, where relu' is 0
    (torch's threshold_backward; activations.h's x <= 0)."""
    values = 3 * torch.randn(shape)
    values.view(-1)[::5] = 0
    return values.to(dtype)


def activation_and_grad(name: str, x: torch.Tensor):
    """act(x) and act'(x) in fp64, by the reference's activation and autograd."""
    x = x.double().requires_grad_()
    value = activation_fn(name)(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


def run_dpre(lib, dtype, M, cols, grid, act="relu", alias=False):
    """DpreOp<act>: a_s = s·act(pre), dpre = s·dz·act'(pre), partial of dpre. alias: fp32 dz is
    dpre, updated in place, as adapter_cuda.cpp passes it."""
    pre = inp(activation_input((M, cols), dtype))
    dz = inp(torch.randn(M, cols))
    dz_values = dz.t.clone()
    dpre = dz if alias else out((M, cols), dtype)
    a_s = out((M, cols), dtype)
    partial = out((row_groups(M), cols), torch.float32)
    code = ACTIVATIONS.index(act)
    call(lib, "adapter_dpre", DTYPE_CODE[dtype], code, pre.ptr(), dz.ptr(), dpre.ptr(), a_s.ptr(), SCALE,
         partial.ptr(), M, cols, *grid)

    s = float(torch.tensor(SCALE, dtype=torch.float32))
    guarded = {"pre": pre, "dz": dz, "dpre": dpre, "a_s": a_s, "partial": partial}
    if act == "relu":  # exact: act(x) is x or 0, act'(x) 1 or 0 (0 at 0, as the kernel)
        x = pre.t.float()
        grad = (x > 0).float()
        terms = s * dz_values.double() * grad.double()
        exact = {
            "a_s": (a_s, (SCALE * torch.relu(x)).to(dtype)),
            "dpre": (dpre, (SCALE * dz_values * grad).to(dtype)),
        }
        return Run(partial, terms, 0.5 * EPS32 * terms.abs(), exact=exact, guarded=guarded)
    x = pre.t.double()
    value, grad = activation_and_grad(act, x)
    terms = s * dz_values.double() * grad
    term_err = ACT_ULPS * EPS32 * (s * dz_values.double()).abs() * (grad.abs() + 1 + x.abs())
    close = {
        "a_s": (a_s, s * value, ACT_ULPS * EPS32 * s * (value.abs() + 1 + x.abs())),
        "dpre": (dpre, terms, term_err),
    }
    return Run(partial, terms, term_err, close=close, guarded=guarded)


def run_colsum(lib, dtype, M, cols, grid, copy=False):
    """ColsumOp: partial of grad_out, and its copy when asked."""
    src = inp(torch.randn(M, cols).to(dtype))
    dst = out((M, cols), dtype) if copy else None
    partial = out((row_groups(M), cols), torch.float32)
    call(lib, "adapter_colsum", DTYPE_CODE[dtype], src.ptr(), dst.ptr() if copy else None, partial.ptr(), M, cols, *grid)
    terms = src.t.double()
    exact = {"copy": (dst, src.t)} if copy else {}
    guarded = {"src": src, "partial": partial}
    if copy:
        guarded["copy"] = dst
    return Run(partial, terms, torch.zeros_like(terms), exact=exact, guarded=guarded)


def run_input_grad(lib, dtype, M, cols, grid, alias=False):
    """InputGradOp: dx = g ⊙ s, partial of g ⊙ x. alias: fp32 g is dx, as ia3_linear_cuda.cpp
    passes it."""
    g = inp(torch.randn(M, cols))
    g_values = g.t.clone()
    x = inp(torch.randn(M, cols).to(dtype))
    scale = inp(torch.randn(cols).to(dtype))
    dx = g if alias else out((M, cols), dtype)
    partial = out((row_groups(M), cols), torch.float32)
    call(lib, "ia3_input_grad", DTYPE_CODE[dtype], g.ptr(), x.ptr(), scale.ptr(), dx.ptr(), partial.ptr(), M, cols, *grid)
    terms = g_values.double() * x.t.double()  # exact in fp64: 24-bit by 24-bit significands
    exact = {"dx": (dx, (g_values * scale.t.float()).to(dtype))}
    guarded = {"g": g, "x": x, "scale": scale, "dx": dx, "partial": partial}
    return Run(partial, terms, 0.5 * EPS32 * terms.abs(), exact=exact, guarded=guarded)


def run_output_grad(lib, dtype, M, cols, grid, scaled=False):
    """OutputGradOp: partial of grad_out ⊙ z, and scaled_grad = grad_out ⊙ s when asked."""
    grad_out = inp(torch.randn(M, cols).to(dtype))
    z = inp(torch.randn(M, cols).to(dtype))
    scale = inp(torch.randn(cols).to(dtype))
    sg = out((M, cols), dtype) if scaled else None
    partial = out((row_groups(M), cols), torch.float32)
    call(lib, "ia3_output_grad", DTYPE_CODE[dtype], grad_out.ptr(), z.ptr(), scale.ptr(), sg.ptr() if scaled else None,
         partial.ptr(), M, cols, *grid)
    terms = grad_out.t.double() * z.t.double()
    exact = {"scaled_grad": (sg, (grad_out.t.float() * scale.t.float()).to(dtype))} if scaled else {}
    guarded = {"grad_out": grad_out, "z": z, "scale": scale, "partial": partial}
    if scaled:
        guarded["scaled_grad"] = sg
    return Run(partial, terms, 0.5 * EPS32 * terms.abs(), exact=exact, guarded=guarded)


# Every op of the column sums: name -> run(lib, dtype, M, cols, grid).
OPS = {
    **{f"dpre-{act}": functools.partial(run_dpre, act=act) for act in ACTIVATIONS},
    "colsum": run_colsum,
    "colsum-copy": functools.partial(run_colsum, copy=True),
    "input_grad": run_input_grad,
    "output_grad": run_output_grad,
    "output_grad-scaled": functools.partial(run_output_grad, scaled=True),
}


def check_op(lib, op, dtype, M, cols, grid=None) -> Run:
    run = OPS[op](lib, dtype, M, cols, grid or column_grid(lib, M, cols))
    run.check(f"{op} {dtype} M={M} cols={cols} grid={grid}")
    return run


# ---------------------------------------------------------------------------------------
# Geometry.


@pytest.mark.parametrize("M", [0, 1, 63, 64, 65, 200, 300, 16384, 16385, 10**6, 2**40])
def test_column_geometry(lib, M):
    """column_geometry's groups are row_groups.h's (the rows of partial the glue allocates), of
    group_rows rows each (more than 64 once M > 256 · 64), and the grid covers the column tiles
    and groups up to kMaxBlocks."""
    for cols in (1, 31, 32, 33, 70, 2**40):
        rows, groups, col_tiles, grid_x, grid_y = geometry(lib, "column_geometry", M, cols, n_out=5)
        assert (rows, groups) == (group_rows(M), row_groups(M))
        assert lib.dk_ew_host_row_groups(M) == groups
        assert (groups - 1) * rows < M <= groups * rows or M == groups == 0
        assert col_tiles == -(-cols // COL_TILE)
        assert (grid_x, grid_y) == (min(col_tiles, MAX_BLOCKS), min(groups, MAX_BLOCKS))


def test_other_geometries(lib):
    """init: column blocks of 256 by rows; activation: flat blocks of 256; scale: blocks of 256
    packs by rows; each capped at kMaxBlocks."""
    for M, d in [(1, 1), (3, 256), (3, 257), (70000, 300)]:
        assert geometry(lib, "adapter_init_geometry", M, d) == (-(-d // THREADS), min(M, MAX_BLOCKS))
        assert geometry(lib, "ia3_scale_geometry", M, d) == (-(-d // THREADS), min(M, MAX_BLOCKS))
    for n in [1, 256, 257, MAX_BLOCKS * THREADS + 1]:
        assert geometry(lib, "adapter_flat_geometry", n) == (min(-(-n // THREADS), MAX_BLOCKS), 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_aligned(lib, dtype):
    """launch_ia3_scale takes packs of 4 only for pointers aligned to 4 elements."""
    base = torch.empty(64, dtype=dtype)
    assert base.data_ptr() % 64 == 0
    for k in range(9):
        ptr = base.data_ptr() + k * base.element_size()
        assert lib.dk_ew_host_ia3_pack_aligned(ptr, DTYPE_CODE[dtype]) == (k % PACK == 0)


# ---------------------------------------------------------------------------------------
# Column sums.

SHAPES = [(M, cols) for M in (1, 63, 64, 65, 200, 300) for cols in (1, 31, 32, 33, 70)]


@pytest.mark.parametrize("M,cols", SHAPES, ids=str)
def test_column_sums_every_shape(lib, M, cols):
    """Rows at and around a group (64), columns at and around a tile (32), several of each; three
    ops, one per dtype, each writing an element output, two with a per-column value (op.column)."""
    check_op(lib, "input_grad", torch.float32, M, cols)
    check_op(lib, "output_grad-scaled", torch.bfloat16, M, cols)
    check_op(lib, "colsum-copy", torch.float16, M, cols)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_column_sum_ops(lib, op, dtype):
    """Every op in every dtype: one group with a partial tile, and 5 groups by 3 tiles."""
    for M, cols in [(65, 33), (300, 70)]:
        check_op(lib, op, dtype, M, cols)


@pytest.mark.parametrize("grid", [(1, 1), (2, 3)], ids=str)
@pytest.mark.parametrize("op", ["dpre-gelu", "colsum-copy", "input_grad", "output_grad-scaled"])
def test_column_sums_grid_stride(lib, op, grid):
    """5 groups by 3 tiles on a grid of 1 block, or 2 by 3 (the tile and group loops stride
    unevenly): the same results, bit for bit, as on the launcher's grid of 3 by 5, since each
    (group, tile) is summed in the same order whichever block does it."""
    M, cols = 300, 70
    assert column_grid(lib, M, cols) == (3, 5)
    torch.manual_seed(1)
    strided = check_op(lib, op, torch.float32, M, cols, grid).outputs()
    torch.manual_seed(1)
    full = check_op(lib, op, torch.float32, M, cols).outputs()
    for name in full:
        assert_bits_equal(strided[name], full[name], f"{op} grid {grid} vs (3, 5): {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_column_sums_groups_above_64_rows(lib, dtype):
    """M = 256 · 64 + 1: 253 groups of 65 rows (the last of 5), on the launcher's grid and on a
    grid of 2 by 3."""
    M, cols = 256 * 64 + 1, 2
    assert (group_rows(M), row_groups(M)) == (65, 253)
    check_op(lib, "input_grad", dtype, M, cols)
    check_op(lib, "colsum-copy", dtype, M, cols, (2, 3))


@pytest.mark.parametrize("M,cols", [(65, 33), (300, 70)], ids=str)
@pytest.mark.parametrize("op", ["dpre", "input_grad"])
def test_fp32_in_place(lib, op, M, cols):
    """fp32 dz is dpre (DpreOp), g is dx (InputGradOp), as the glue passes them: each element is
    read before it is written, so the results are those of separate buffers, bit for bit."""
    grid = column_grid(lib, M, cols)
    results = []
    for alias in (False, True):
        torch.manual_seed(2)
        if op == "dpre":
            run = run_dpre(lib, torch.float32, M, cols, grid, act="silu", alias=alias)
        else:
            run = run_input_grad(lib, torch.float32, M, cols, grid, alias=alias)
        run.check(f"{op} alias={alias}")
        results.append(run.outputs())
    for name in results[0]:
        assert_bits_equal(results[1][name], results[0][name], f"{op} in place: {name}")


# ---------------------------------------------------------------------------------------
# init, activation, scale.

INIT_SHAPES = [(1, 1), (63, 31), (65, 33), (200, 70), (3, 256), (3, 300), (2, 513)]


def check_init(lib, dtype, M, d, bias, grid=None):
    residual = inp(torch.randn(M, d).to(dtype))
    b_up = inp(torch.randn(d).to(dtype)) if bias else None
    result = out((M, d), dtype)
    grid = grid or geometry(lib, "adapter_init_geometry", M, d)
    call(lib, "adapter_init", DTYPE_CODE[dtype], residual.ptr(), b_up.ptr() if bias else None, result.ptr(), M, d,
         SCALE, *grid)
    expected = (residual.t.float() + SCALE * b_up.t.float()).to(dtype) if bias else residual.t
    assert_bits_equal(result.t, expected, f"init {dtype} M={M} d={d} bias={bias} grid={grid}")
    for name, t in {"residual": residual, "b_up": b_up, "out": result}.items():
        if t is not None:
            t.assert_guard_intact(f"init {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no_b_up", "b_up"])
def test_init(lib, dtype, bias):
    """out = residual + s·b_up (or the residual's copy): rows by blocks of 256 columns, the last
    partial, 1 to 3 column blocks."""
    for M, d in INIT_SHAPES:
        check_init(lib, dtype, M, d, bias)


@pytest.mark.parametrize("grid", [(1, 1), (2, 3)], ids=str)
def test_init_grid_stride(lib, grid):
    """300 rows by 2 column blocks on fewer blocks: rows stride by gridDim.y, columns by
    gridDim.x · 256."""
    check_init(lib, torch.bfloat16, 300, 300, True, grid)


def check_activation(lib, act, dtype, n, grid=None):
    pre = inp(activation_input((n,), dtype))
    a = out((n,), dtype)
    grid = grid or geometry(lib, "adapter_flat_geometry", n)
    call(lib, "adapter_activation", DTYPE_CODE[dtype], ACTIVATIONS.index(act), pre.ptr(), a.ptr(), n, *grid)
    name = f"activation {act} {dtype} n={n} grid={grid}"
    if act == "relu":
        assert_bits_equal(a.t, torch.relu(pre.t), name)
    else:
        x = pre.t.double()
        value, _ = activation_and_grad(act, x)
        assert_within(a.t, value, ACT_ULPS * EPS32 * (value.abs() + 1 + x.abs()), name)
    pre.assert_guard_intact(f"{name} pre")
    a.assert_guard_intact(f"{name} a")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation(lib, act, dtype):
    """a = act(pre) over n elements: below, at and above one block of 256, and 83 blocks."""
    for n in (1, 255, 256, 257, 21000):
        check_activation(lib, act, dtype, n)


@pytest.mark.parametrize("grid", [(1, 1), (3, 1)], ids=str)
@pytest.mark.parametrize("act", ["gelu_tanh", "silu"])
def test_activation_grid_stride(lib, act, grid):
    """2100 elements (9 blocks) on 1 or 3 blocks."""
    check_activation(lib, act, torch.float16, 2100, grid)


# (rows, cols) for packs of 4 (cols % 4 == 0; 1028 = 257 packs, 2 blocks) and of 1 (257: 2 blocks).
SCALE_SHAPES = {4: [(1, 4), (3, 68), (5, 1028)], 1: [(1, 1), (7, 33), (3, 70), (5, 257)]}


def check_scale(lib, dtype, width, per_column, rows, cols, grid=None):
    # Packs of 1 are what launch_ia3_scale runs on pointers not aligned to 4 elements: place
    # every tensor one element into its buffer.
    lead = 0 if width == PACK else 1
    src = inp(torch.randn(rows, cols).to(dtype), lead)
    scale = inp(torch.randn(cols if per_column else rows).to(dtype), lead)
    dst = out((rows, cols), dtype, lead)
    aligned = [lib.dk_ew_host_ia3_pack_aligned(t.ptr(), DTYPE_CODE[dtype]) for t in (src, scale, dst)]
    assert aligned == [int(width == PACK)] * 3
    grid = grid or geometry(lib, "ia3_scale_geometry", rows, cols // width)
    call(lib, "ia3_scale", DTYPE_CODE[dtype], width, int(per_column), src.ptr(), scale.ptr(), dst.ptr(), rows, cols, *grid)
    s = scale.t.float()
    expected = (src.t.float() * (s[None, :] if per_column else s[:, None])).to(dtype)
    name = f"scale {dtype} width={width} per_column={per_column} {rows}x{cols} grid={grid}"
    assert_bits_equal(dst.t, expected, name)
    for tensor_name, t in {"src": src, "scale": scale, "dst": dst}.items():
        t.assert_guard_intact(f"{name} {tensor_name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_column", [True, False], ids=["per_column", "per_row"])
@pytest.mark.parametrize("width", [PACK, 1], ids=["pack4", "pack1"])
def test_scale(lib, width, per_column, dtype):
    """dst = src ⊙ s, s broadcast over rows (per column) or columns (per row)."""
    for rows, cols in SCALE_SHAPES[width]:
        check_scale(lib, dtype, width, per_column, rows, cols)


@pytest.mark.parametrize("grid", [(1, 1), (2, 3)], ids=str)
@pytest.mark.parametrize("width", [PACK, 1], ids=["pack4", "pack1"])
def test_scale_grid_stride(lib, width, grid):
    """7 rows of 1028 columns (2 blocks of packs of 4, 5 of packs of 1) on fewer blocks."""
    check_scale(lib, torch.float16, width, True, 7, 1028, grid)
    check_scale(lib, torch.float32, width, False, 7, 1028, grid)
