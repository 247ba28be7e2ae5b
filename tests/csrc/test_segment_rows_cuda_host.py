"""segmented_lora_linear's CUDA row kernels (gather, scatter-add), run on the CPU, against torch.

What this proves: the index math and grid-striding of ``csrc/cuda/segmented_lora_linear.cu``
write every element of each output (gather: ``dst[j] = src[rows[j]]``; scatter-add:
``dst[rows[j]] += alpha · src[j]``, in fp32 and rounded once) and nothing outside it, bit for bit
with torch's fp32 formula, for fp32/fp16/bf16, widths around the 256-lane blocks, rows out of
order, and grids smaller than the problem; the launchers' geometry is checked against its rule.

How: the harness ``segment_rows_cuda_host.cu`` includes the very source the GPU build compiles
and runs its ``__host__ __device__`` bodies lane by lane; nvcc builds it once per session.
Inputs sit in NaN-guarded buffers (an out-of-bounds read shows as NaN), outputs in
sentinel-guarded ones that must not change outside the tensor.

Not covered: what only a GPU shows (scheduling, launch configuration), nor the device arithmetic
(nvcc may contract ``dst + alpha · src`` into one fma on the GPU, an fp32 ulp before rounding).
"""

import ctypes
from pathlib import Path

import pytest
import torch

from tests.csrc.nvcc import DTYPE_CODE, NVCC, build_harness
from tests.csrc.test_elementwise_cuda_host import assert_bits_equal, inp, out

HARNESS = Path(__file__).resolve().with_name("segment_rows_cuda_host.cu")

if NVCC is None:
    pytest.skip("nvcc not found", allow_module_level=True)

THREADS = 256  # kSegmentRowsThreads
MAX_BLOCKS = 65535  # kSegmentRowsMaxBlocks
_I64, _INT, _PTR, _F32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float


@pytest.fixture(scope="session")
def lib(tmp_path_factory):
    so = tmp_path_factory.mktemp("segment_rows_cuda_host") / "segment_rows_cuda_host.so"
    lib = ctypes.CDLL(str(build_harness(HARNESS, so)))
    lib.dk_rows_host_geometry.argtypes = [_I64, _I64, _PTR]
    lib.dk_rows_host_gather.argtypes = [_INT, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64]
    lib.dk_rows_host_gather.restype = _INT
    lib.dk_rows_host_scatter_add.argtypes = [_INT, _PTR, _PTR, _F32, _PTR, _I64, _I64, _I64, _I64]
    lib.dk_rows_host_scatter_add.restype = _INT
    return lib


def geometry(lib, n, cols):
    values = (ctypes.c_int64 * 2)()
    lib.dk_rows_host_geometry(n, cols, values)
    return tuple(values)


@pytest.mark.parametrize("n, cols", [(1, 1), (5, 255), (7, 256), (300, 3), (70000, 1), (2, 65535 * 256 + 1)])
def test_geometry_is_the_rule(lib, n, cols):
    assert geometry(lib, n, cols) == (min(-(-cols // THREADS), MAX_BLOCKS), min(n, MAX_BLOCKS))


SHAPES = [(1, 1), (6, 257), (9, 256), (13, 31)]  # (M, cols); widths around one 256-lane block


@pytest.mark.parametrize("small_grid", [False, True], ids=["launch-grid", "grid-stride"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gather_and_scatter_add(lib, dtype, shape, small_grid):
    M, cols = shape
    g = torch.Generator().manual_seed(M * 1000 + cols)
    rows = torch.randperm(M, generator=g)[: max(1, M - 2)]  # out of order, some rows left out
    n = rows.numel()
    grid = (1, 2) if small_grid else geometry(lib, n, cols)
    src = inp(torch.randn(M, cols, generator=g).to(dtype))
    rows_buf = rows.contiguous()
    gathered = out((n, cols), dtype)
    assert lib.dk_rows_host_gather(DTYPE_CODE[dtype], src.ptr(), rows_buf.data_ptr(), gathered.ptr(), n, cols,
                                   *grid) == 0
    assert_bits_equal(gathered.t, src.t[rows], "gather")
    gathered.assert_guard_intact("gather dst")

    alpha = 0.37
    update = inp(torch.randn(n, cols, generator=g).to(dtype))
    dst = out((M, cols), dtype)
    dst.t.copy_(torch.randn(M, cols, generator=g).to(dtype))
    before = dst.t.clone()
    assert lib.dk_rows_host_scatter_add(DTYPE_CODE[dtype], update.ptr(), rows_buf.data_ptr(), alpha, dst.ptr(), n,
                                        cols, *grid) == 0
    expected = before.clone()
    expected[rows] = (before[rows].float() + torch.tensor(alpha, dtype=torch.float32) * update.t.float()).to(dtype)
    assert_bits_equal(dst.t, expected, "scatter-add")
    dst.assert_guard_intact("scatter-add dst")


def test_unknown_dtype_and_empty_grid_are_refused(lib):
    src = torch.zeros(2, 3)
    rows = torch.tensor([1, 0])
    dst = torch.zeros(2, 3)
    assert lib.dk_rows_host_gather(7, src.data_ptr(), rows.data_ptr(), dst.data_ptr(), 2, 3, 1, 1) == 1
    assert lib.dk_rows_host_gather(0, src.data_ptr(), rows.data_ptr(), dst.data_ptr(), 2, 3, 0, 1) == 1
