"""Triton kernels and launchers of ``segmented_lora_linear`` (many LoRA adapters in one batch).

Shapes (2-D views): x ``[M, K]``, weight W ``[N, K]`` (any strides: only cuBLAS reads it), bias
``[N]``; adapter i of n has A_i ``[R_i, K]``, B_i ``[N, R_i]``, scaling s_i, dropout p_i, seed
seeds[i] and the rows ``rows_i = order[offsets[i]:offsets[i + 1]]`` (M_i of them, ascending); x_i,
dY_i are x, dY at those rows, j the position of a row inside its segment.

Forward, one base GEMM and two kernels:
  0. cuBLAS   ``y = x W^T + b``                                   all M rows (rows of no adapter too)
  1. shrink   ``xa_i = drop_i(x_i) A_i^T``                        ``[M_i, R_i]``, one launch, all i
  2. expand   ``y[rows_i] += s_i xa_i B_i^T``                     in place on y, one launch, all i
Backward, one base GEMM and three kernels (plus a memset):
  0. cuBLAS   ``dx = dY W``
  3. dY       ``dxa_i = s_i dY_i B_i`` and ``dB_i += s_i dY_i^T xa_i`` from one read of dY_i
  4. dA + dx  ``dA_i += dxa_i^T drop_i(x_i)`` and ``dx[rows_i] += keep_i (dxa_i A_i) / (1 - p_i)``:
              both read the same x_i tile, dxa_i tile and keep mask, so the mask is drawn once per
              element in backward (lora_linear draws it twice, in dA and in dx)
  5. cast     fp32 dA_i / dB_i partial sums -> the per-adapter outputs in x's dtype

Segments in one launch (Punica's SGMV idea, written for this project): every program of kernels
1-4 works on a tile of rows of ONE segment. The grid has ``sum_i cdiv(M_i, BLOCK_M)`` row tiles;
a program finds its segment from ``offsets`` alone (a vectorised cumulative sum of the segments'
tile counts, ``MAX_SEG`` lanes), so the tile map needs no host work per block size and the
autotuner may pick BLOCK_M freely. Rows are gathered through ``order``; rows of no adapter are in
no segment and keep the base output. The per-adapter tensors (A_i, B_i, xa_i, the outputs) are
not stacked or padded in memory: a small int64 *segment table* (one host-to-device copy per call)
holds their addresses, ranks, scalings, dropout probabilities, seeds and workspace offsets, and
the kernels load them by segment. The rank is padded to ``BLOCK_R = block_r(max_i R_i)`` in
registers only (masked loads), as lora_linear pads it.

Dropout: element (j, k) of x_i is kept by ``rng.dropout_keep(seeds[i], j * K + k, p_i)``, exactly
the mask lora_linear's kernels draw for a ``[M_i, K]`` input with seed seeds[i]. A launch draws
masks only when some p_i > 0 (``HAS_DROPOUT``); a segment with p_i = 0 in such a launch keeps every
element (uniform >= 0) with keep scale 1.0, the mask-free result exactly. NOTE a per-segment
run-time branch around the mask cost registers instead: inside the K loop it took the rank-64
32 x 128 shrink from 180 to 254 registers on sm_80 (spilling at 64 x 64); around the whole loop it
needs each loop twice. Only a batch mixing p = 0 and p > 0 adapters pays the extra Philox.

NOTE launches per call, and why one launch per kernel over all segments. Forward: cuBLAS GEMM +
shrink + expand = 3 kernels; backward: cuBLAS GEMM + memset + dY + dA/dx + cast = 5 kernels; each
call also copies one segment table (``n + 1 + 12 n`` words) to the device. Per-adapter launches
of lora_linear-style kernels would take 2n + 1 forward and 4n + 2 backward: 17 and 34 kernels for
n = 8 adapters, per projection of every layer, each a Triton launch (tens of microseconds of
Python launch path, several of GPU launch gap), and each adapter's kernels would only fill the
GPU when its M_i is large, while a mixed batch is many small segments (the case the op exists
for). The costs of the single launch: building the table, measured on this project's 2-core CPU
machine at 21 us (n = 1) and 44 us (n = 8) of Python (``triton.cdiv`` alone cost 12 us a call, so
the grids use plain integer ceilings); the rank padded to the batch's largest (the kernels are
memory bound on x / y / dY / dx, the idle dot lanes cost little); and per-adapter addresses read
from memory (see ``_field_ptr`` for how they keep vectorised loads). No GPU was available to time
either variant on a device.
"""

from __future__ import annotations

import array
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from deltakern.triton_kernels.common import AotSpec, block_r, dot_precision, launch
from deltakern.triton_kernels.rng import dropout_keep, philox_seed

# --------------------------------------------------------------------------------------------
# Segment table
# --------------------------------------------------------------------------------------------

# The table is int64: offsets (n + 1 words), then one n-word field per entry below, adapter i at
# index i: the integer fields, then the float fields as float64 (rounded to fp32 in the kernel, the
# rounding a Python float launched as an fp32 argument gets: lora_linear's dropout_p).
_F_A, _F_B, _F_XA, _F_RANK, _F_SEED = 0, 1, 2, 3, 4
# Backward only: where dA_i / dB_i accumulate in their fp32 workspaces, and their outputs. The
# cast kernel reads _F_DA_OFF.._F_DB_OFF and _F_DA_OUT.._F_DB_OUT as 2n-word fields (dA first).
_F_DA_OFF, _F_DB_OFF, _F_DA_OUT, _F_DB_OUT = 5, 6, 7, 8
_F_SCALING, _F_P, _F_KEEP = 9, 10, 11
# The same indices for the kernels (JIT functions read globals only as constexprs).
A_ = tl.constexpr(_F_A)
B_ = tl.constexpr(_F_B)
XA_ = tl.constexpr(_F_XA)
RANK_ = tl.constexpr(_F_RANK)
SEED_ = tl.constexpr(_F_SEED)
DA_OFF_ = tl.constexpr(_F_DA_OFF)
DB_OFF_ = tl.constexpr(_F_DB_OFF)
DA_OUT_ = tl.constexpr(_F_DA_OUT)
SCALING_ = tl.constexpr(_F_SCALING)
P_ = tl.constexpr(_F_P)
KEEP_ = tl.constexpr(_F_KEEP)


def _max_seg(n: int) -> int:
    """Lanes of the in-kernel segment search: a power of two >= n (16 at least: one compile for
    the usual adapter counts)."""
    return max(16, triton.next_power_of_2(n))


def _cdiv(a: int, b: int) -> int:
    # Plain integer ceiling: triton.cdiv cost ~12 us a call from Python here (a JIT function).
    return -(-a // b)


def _row_tiles(offsets, rows_per_tile: int) -> int:
    """Row tiles of all segments: the grid of the per-segment kernels."""
    return sum(_cdiv(b - a, rows_per_tile) for a, b in itertools.pairwise(offsets))


def _address_unit(element_size: int, addresses) -> int:
    """Elements per unit of the table's addresses: 16 bytes when every address is 16-byte aligned
    (the caching allocator's tensors are: loads then vectorise as for a kernel argument), else
    one element."""
    aligned = 16 % element_size == 0 and all(a % 16 == 0 for a in addresses)
    return 16 // element_size if aligned else 1


def _segment_table(device, offsets, base, tensors: dict, ints: dict, scalings, dropout_p):
    """(the segment table on ``device``, its address unit).

    base: the tensor the kernels get as ``lr_ptr``; tensors: field -> n tensors of base's dtype,
    stored as offsets from base in address units; ints: field -> n ints; absent fields are 0.
    """
    n = len(offsets) - 1
    base_address = base.data_ptr()
    addresses = {field: [t.data_ptr() for t in ts] for field, ts in tensors.items()}
    unit = _address_unit(base.element_size(), [base_address, *(a for v in addresses.values() for a in v)])
    step = base.element_size() * unit
    words = array.array("q", offsets)
    zeros = [0] * n
    for field in range(_F_SCALING):
        if field in addresses:
            words.extend([(a - base_address) // step for a in addresses[field]])
        else:
            words.extend(ints.get(field, zeros))
    floats = array.array("d", scalings)
    floats.extend(dropout_p)
    floats.extend([1.0 / (1.0 - p) for p in dropout_p])
    # One buffer, one host-to-device copy; array + frombuffer take a third of torch.tensor(list)'s
    # time for ~100 words.
    table = torch.frombuffer(bytearray(words.tobytes() + floats.tobytes()), dtype=torch.int64)
    return table.to(device), unit


# --------------------------------------------------------------------------------------------
# Autotune configurations (sm_80 / sm_90), one small config for the interpreter
# --------------------------------------------------------------------------------------------

# Every config is checked by tests/triton_kernels/test_compile.py to compile without spills on
# sm_80 and sm_90 for BLOCK_R 16 and 64.

# Shrink streams x_i once into a thin [*, R] result (memory bound), as lora_linear's shrink:
# wide BLOCK_K keeps bytes in flight, 32-64 row tiles give enough CTAs for segments of a few
# hundred rows; the x tile is where the mask is drawn, so at most 32 elements per thread.
SHRINK_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 128}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_stages=3, num_warps=8),
]

# Expand reads and writes its y tile once (memory bound on y); the low-rank dot is K = R deep.
# 16-row tiles serve segments of a few rows (decoding), the larger ones long segments.
EXPAND_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_stages=2, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_stages=2, num_warps=8),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_stages=2, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 256}, num_stages=2, num_warps=4),
]

# dY: lora_linear's dY kernel per segment (the dxa accumulator, xa and the [BLOCK_N, R] dB
# partial live at once). At rank 64 on sm_80 these take 228-254 registers; 128 x 64 / 8 warps
# spilled 16 B there and 32 x 128 / 4 warps 6.4 KB, so neither is offered.
DY_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_stages=4, num_warps=4),
]

# dA + dx: a CTA owns a BLOCK_K column slab of one segment's M_TILES row tiles; per row tile it
# draws the mask of its [BLOCK_M, BLOCK_K] x tile once for both products, adds the dx tile and
# accumulates its [R, BLOCK_K] dA partial (added with atomics at the end). The live state is the
# dA accumulator, the A slab, the fp32 dx term and the Philox state: at rank 64 on sm_80, 64-row
# tiles spilled (64 x 64 / 4 warps 656 B, 64 x 64 / 8 warps 56 B, 64 x 128 / 8 warps 412 B), so
# the tiles are 32 rows (16 x-tile elements per thread) and M_TILES sets the atomics' share.
DADX_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 64, "M_TILES": 4}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 64, "M_TILES": 8}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 128, "M_TILES": 4}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 128, "M_TILES": 8}, num_stages=3, num_warps=8),
]

CAST_CONFIGS = [triton.Config({"BLOCK_SIZE": 1024}, num_stages=1, num_warps=4)]

# The interpreter runs each program in numpy: the tl.dot minimum of 16 rows, tiles small enough
# that the test shapes span several of them and end mid-tile.
INTERPRETER_CONFIG = {
    "shrink": {"BLOCK_M": 16, "BLOCK_K": 32},
    "expand": {"BLOCK_M": 16, "BLOCK_N": 32},
    "dy": {"BLOCK_M": 16, "BLOCK_N": 32},
    "dadx": {"BLOCK_M": 16, "BLOCK_K": 32, "M_TILES": 2},
    "cast": {"BLOCK_SIZE": 256},
}

# The low-rank dot of the expand goes 16 ranks at a time (the mma K step), as lora_linear's
# low_rank_tile: its operand tiles stay small whatever BLOCK_R.
_R_CHUNK = tl.constexpr(16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _segment_tile(tile, table_ptr, n, ROWS: tl.constexpr, MAX_SEG: tl.constexpr):
    """(segment, its first row index j of this tile, its start in ``order``, its rows) of row
    tile ``tile`` (0-based over all segments; ``ROWS`` rows a tile, ``cdiv(M_i, ROWS)`` tiles
    per segment, segments in order). Vectorised over MAX_SEG >= n lanes, no loop."""
    i = tl.arange(0, MAX_SEG)
    valid = i < n
    lo = tl.load(table_ptr + i, mask=valid, other=0)
    hi = tl.load(table_ptr + i + 1, mask=valid, other=0)
    tiles = (hi - lo + ROWS - 1) // ROWS
    ends = tl.cumsum(tiles, 0)
    # Segments whose tiles all come before this one; the next (with >= 1 tile) holds it.
    seg = tl.sum((ends <= tile).to(tl.int32), 0)
    here = i == seg
    start = tl.sum(tl.where(here, lo, 0), 0)
    rows = tl.sum(tl.where(here, hi - lo, 0), 0)
    first_tile = tl.sum(tl.where(here, ends - tiles, 0), 0)
    return seg, (tile - first_tile) * ROWS, start, rows


@triton.jit
def _field(table_ptr, n, field: tl.constexpr, seg):
    """int64 entry ``field`` of segment ``seg``."""
    return tl.load(table_ptr + (n + 1) + field * n + seg)


@triton.jit
def _field_f32(table_ptr, n, field: tl.constexpr, seg):
    """Float entry (stored as float64 bits) rounded to fp32."""
    return _field(table_ptr, n, field, seg).to(tl.float64, bitcast=True).to(tl.float32)


@triton.jit
def _field_ptr(table_ptr, n, field: tl.constexpr, seg, base_ptr, UNIT: tl.constexpr):
    """Per-adapter tensor of ``field``: ``base_ptr`` + its entry * UNIT elements.

    An address loaded from memory has no known alignment, so its loads are not vectorised and
    each element keeps its own 64-bit address: the rank-64 shrink took 255 registers and spilled
    164 B on sm_80 that way, 126 and no spill with the same tensor as a kernel argument. An
    aligned base plus a multiple of UNIT (16 bytes) tells the compiler what the argument would.
    """
    return base_ptr + _field(table_ptr, n, field, seg) * UNIT


@triton.jit
def _seg_shrink_kernel(
    x_ptr, lr_ptr, order_ptr, table_ptr, n, K, M_ACTIVE,
    HAS_DROPOUT: tl.constexpr, UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, MAX_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """xa_i[j, :R_i] = drop_i(x[order[start + j]]) A_i^T for the BLOCK_M rows j of this tile."""
    seg, j0, start, rows_i = _segment_tile(tl.program_id(0), table_ptr, n, BLOCK_M, MAX_SEG)
    R = _field(table_ptr, n, RANK_, seg)
    a_ptr = _field_ptr(table_ptr, n, A_, seg, lr_ptr, UNIT)
    xa_ptr = _field_ptr(table_ptr, n, XA_, seg, lr_ptr, UNIT)
    offs_j = j0 + tl.arange(0, BLOCK_M)
    j_ok = offs_j < rows_i
    rows = tl.load(order_ptr + start + offs_j, mask=j_ok, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    if HAS_DROPOUT:
        p = _field_f32(table_ptr, n, P_, seg)
        seed = _field(table_ptr, n, SEED_, seg)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=j_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            # A segment with p = 0 keeps every element (uniform >= 0) and its keep scale is 1.0,
            # so it gets its exact mask-free result without a per-segment branch (see the NOTE).
            x = tl.where(dropout_keep(seed, offs_j[:, None] * K + offs_k[None, :], p), x, 0.0)
        a_t = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, a_t, acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        # 1/(1-p) once on the fp32 sum, as lora_linear.
        acc = acc * _field_f32(table_ptr, n, KEEP_, seg)
    tl.store(xa_ptr + offs_j[:, None] * R + offs_r[None, :], acc.to(xa_ptr.dtype.element_ty),
             mask=j_ok[:, None] & r_ok[None, :])


@triton.jit
def _seg_expand_kernel(
    y_ptr, lr_ptr, order_ptr, table_ptr, n, N, M_ACTIVE,
    UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MAX_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y[order[start + j], cols] += s_i xa_i[j] B_i[cols]^T; grid (row tiles, N / BLOCK_N)."""
    seg, j0, start, rows_i = _segment_tile(tl.program_id(0), table_ptr, n, BLOCK_M, MAX_SEG)
    R = _field(table_ptr, n, RANK_, seg)
    b_ptr = _field_ptr(table_ptr, n, B_, seg, lr_ptr, UNIT)
    xa_ptr = _field_ptr(table_ptr, n, XA_, seg, lr_ptr, UNIT)
    scaling = _field_f32(table_ptr, n, SCALING_, seg)
    offs_j = j0 + tl.arange(0, BLOCK_M)
    j_ok = offs_j < rows_i
    rows = tl.load(order_ptr + start + offs_j, mask=j_ok, other=0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.static_range(0, BLOCK_R, _R_CHUNK):
        offs_r = r0 + tl.arange(0, _R_CHUNK)
        r_ok = offs_r < R
        xa = tl.load(xa_ptr + offs_j[:, None] * R + offs_r[None, :], mask=j_ok[:, None] & r_ok[None, :], other=0.0)
        b_t = tl.load(b_ptr + offs_n[None, :] * R + offs_r[:, None], mask=n_ok[None, :] & r_ok[:, None], other=0.0)
        acc = tl.dot(xa, b_t, acc, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + rows[:, None] * N + offs_n[None, :]
    ok = j_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + scaling * acc).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _seg_dy_kernel(
    dy_ptr, lr_ptr, order_ptr, table_ptr, dxa_ptr, db_ws_ptr, n, N, M_ACTIVE,
    UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MAX_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dxa[start + j, :] = s_i dY[rows] B_i (BLOCK_R columns, zero past R_i; x's dtype) and
    db_ws[db_off_i:] ([N, R_i], fp32, pre-zeroed) += s_i dY[rows]^T xa_i[j], from one read of dY."""
    seg, j0, start, rows_i = _segment_tile(tl.program_id(0), table_ptr, n, BLOCK_M, MAX_SEG)
    R = _field(table_ptr, n, RANK_, seg)
    b_ptr = _field_ptr(table_ptr, n, B_, seg, lr_ptr, UNIT)
    xa_ptr = _field_ptr(table_ptr, n, XA_, seg, lr_ptr, UNIT)
    scaling = _field_f32(table_ptr, n, SCALING_, seg)
    db_ptr = db_ws_ptr + _field(table_ptr, n, DB_OFF_, seg)
    offs_j = j0 + tl.arange(0, BLOCK_M)
    j_ok = offs_j < rows_i
    rows = tl.load(order_ptr + start + offs_j, mask=j_ok, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    xa = tl.load(xa_ptr + offs_j[:, None] * R + offs_r[None, :], mask=j_ok[:, None] & r_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(dy_ptr + rows[:, None] * N + offs_n[None, :], mask=j_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(dy, b, acc, input_precision=DOT_PRECISION)
        db = tl.dot(tl.trans(dy), xa, input_precision=DOT_PRECISION) * scaling
        # Relaxed ordering: the partial sums only need atomicity.
        tl.atomic_add(db_ptr + offs_n[:, None] * R + offs_r[None, :], db, mask=n_ok[:, None] & r_ok[None, :],
                      sem="relaxed")
    tl.store(dxa_ptr + (start + offs_j)[:, None] * BLOCK_R + offs_r[None, :],
             (acc * scaling).to(dxa_ptr.dtype.element_ty), mask=j_ok[:, None])


@triton.jit
def _seg_dadx_kernel(
    x_ptr, lr_ptr, order_ptr, table_ptr, dxa_ptr, dx_ptr, da_ws_ptr, n, K, M_ACTIVE,
    HAS_DROPOUT: tl.constexpr, UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, M_TILES: tl.constexpr, MAX_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """For M_TILES row tiles of one segment and a BLOCK_K column slab:
    dx[rows, cols] += keep (dxa A_i[:, cols]) / (1 - p_i) and da_ws[da_off_i:] ([R_i, K], fp32,
    pre-zeroed) += dxa^T drop_i(x[rows, cols]). Grid (K / BLOCK_K, row groups of M_TILES tiles)."""
    seg, j0, start, rows_i = _segment_tile(tl.program_id(1), table_ptr, n, BLOCK_M * M_TILES, MAX_SEG)
    R = _field(table_ptr, n, RANK_, seg)
    a_ptr = _field_ptr(table_ptr, n, A_, seg, lr_ptr, UNIT)
    da_ptr = da_ws_ptr + _field(table_ptr, n, DA_OFF_, seg)
    offs_k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
    if HAS_DROPOUT:
        p = _field_f32(table_ptr, n, P_, seg)
        seed = _field(table_ptr, n, SEED_, seg)
        keep_scale = _field_f32(table_ptr, n, KEEP_, seg)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for t in range(tl.minimum(tl.cdiv(rows_i - j0, BLOCK_M), M_TILES)):
        offs_j = j0 + t * BLOCK_M + tl.arange(0, BLOCK_M)
        j_ok = offs_j < rows_i
        rows = tl.load(order_ptr + start + offs_j, mask=j_ok, other=0).to(tl.int64)
        ok = j_ok[:, None] & k_ok[None, :]
        dxa = tl.load(dxa_ptr + (start + offs_j)[:, None] * BLOCK_R + offs_r[None, :], mask=j_ok[:, None],
                      other=0.0)
        x = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=ok, other=0.0)
        low = tl.dot(dxa, a, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            # One mask draw serves dA and dx (p = 0 keeps everything, see _seg_shrink_kernel).
            # As 0 / 1 in x's dtype, not a bool block: dx needs it in the mma layout of ``low``
            # and the conversion goes through shared memory, which takes no 1-bit elements (a
            # bool mask failed to compile for sm_80 and sm_90: "element type bit width must be
            # a multiple of 8").
            keep = dropout_keep(seed, offs_j[:, None] * K + offs_k[None, :], p).to(x.dtype)
            x = x * keep
            low = low * (keep.to(tl.float32) * keep_scale)
        acc = tl.dot(tl.trans(dxa), x, acc, input_precision=DOT_PRECISION)
        dx_ptrs = dx_ptr + rows[:, None] * K + offs_k[None, :]
        dx = tl.load(dx_ptrs, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptrs, (dx + low).to(dx_ptr.dtype.element_ty), mask=ok)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], acc, mask=r_ok[:, None] & k_ok[None, :],
                  sem="relaxed")


@triton.jit
def _seg_cast_kernel(ws_ptr, lr_ptr, table_ptr, n, N, K, DB_BASE, UNIT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Output o of 2n (dA_0..dA_{n-1}, dB_0..dB_{n-1}) = its fp32 workspace region in the
    outputs' dtype; grid (blocks of the largest output, 2n)."""
    o = tl.program_id(1)
    is_db = o >= n
    seg = tl.where(is_db, o - n, o)
    numel = _field(table_ptr, n, RANK_, seg) * tl.where(is_db, N, K)
    # o indexes the 2n-word fields (_F_DA_OFF, _F_DB_OFF) and (_F_DA_OUT, _F_DB_OUT) directly.
    src = ws_ptr + _field(table_ptr, n, DA_OFF_, o) + tl.where(is_db, DB_BASE, 0)
    dst = _field_ptr(table_ptr, n, DA_OUT_, o, lr_ptr, UNIT)
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    ok = offs < numel
    tl.store(dst + offs, tl.load(src + offs, mask=ok, other=0.0).to(dst.dtype.element_ty), mask=ok)


seg_shrink_kernel = triton.autotune(SHRINK_CONFIGS, key=["M_ACTIVE", "K", "BLOCK_R"])(_seg_shrink_kernel)
# Expand and dA/dx add into their output in place: the autotuner restores it after each trial.
seg_expand_kernel = triton.autotune(EXPAND_CONFIGS, key=["M_ACTIVE", "N", "BLOCK_R"],
                                    restore_value=["y_ptr"])(_seg_expand_kernel)
# The atomically accumulated workspaces are zeroed before every trial (dA and dB have separate
# ones, so the dA/dx autotuner never wipes the dB sums of the dY kernel).
seg_dy_kernel = triton.autotune(DY_CONFIGS, key=["M_ACTIVE", "N", "BLOCK_R"],
                                reset_to_zero=["db_ws_ptr"])(_seg_dy_kernel)
seg_dadx_kernel = triton.autotune(DADX_CONFIGS, key=["M_ACTIVE", "K", "BLOCK_R"], reset_to_zero=["da_ws_ptr"],
                                  restore_value=["dx_ptr"])(_seg_dadx_kernel)
seg_cast_kernel = triton.autotune(CAST_CONFIGS, key=[])(_seg_cast_kernel)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compiles (triton_kernels.aot)
# --------------------------------------------------------------------------------------------

# Padded rank blocks compiled: the usual LoRA rank (BLOCK_R 16) up to 128. SWEEP_RANKS, where
# every autotune config is compiled: 16 and the largest common rank, 64, the register high-water
# mark.
RANKS = (16, 32, 64, 128)
SWEEP_RANKS = (16, 64)
# MAX_SEG: 16 for up to 16 adapters per batch (one compile for the usual counts), 64 for up to 64.
_MAX_SEGS = (16, 64)
_ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def _aot_signatures(dtype: str, flags: dict) -> dict:
    """Runtime argument types of each kernel for ``dtype`` inputs."""
    t = f"*{dtype}"
    seg = {"lr_ptr": t, "order_ptr": "*i64", "table_ptr": "*i64", "n": "i32", "M_ACTIVE": "i32"}
    return {
        "shrink": {"x_ptr": t, "K": "i32", **seg},
        "expand": {"y_ptr": t, "N": "i32", **seg},
        "dy": {"dy_ptr": t, "dxa_ptr": t, "db_ws_ptr": "*fp32", "N": "i32", **seg},
        "dadx": {"x_ptr": t, "dxa_ptr": t, "dx_ptr": t, "da_ws_ptr": "*fp32", "K": "i32", **seg},
        "cast": {"ws_ptr": "*fp32", "lr_ptr": t, "table_ptr": "*i64", "n": "i32", "N": "i32", "K": "i32",
                 "DB_BASE": "i64"},
    }


AOT = AotSpec(
    # Dropout each way where a kernel has it, on first (the mask is the largest live state).
    kernels={
        "shrink": (seg_shrink_kernel, {"HAS_DROPOUT": (True, False), "MAX_SEG": _MAX_SEGS}),
        "expand": (seg_expand_kernel, {"MAX_SEG": _MAX_SEGS}),
        "dy": (seg_dy_kernel, {"MAX_SEG": _MAX_SEGS}),
        "dadx": (seg_dadx_kernel, {"HAS_DROPOUT": (True, False), "MAX_SEG": _MAX_SEGS}),
        "cast": (seg_cast_kernel, {}),
    },
    signatures=_aot_signatures,
    variants=RANKS,
    sweep_variants=SWEEP_RANKS,
    variant_tag="r",
    variant_constexprs=lambda kernel, rank: {} if kernel == "cast" else {"BLOCK_R": block_r(rank)},
    # UNIT: the table's addresses in 16-byte units when every tensor is 16-byte aligned, else in
    # elements (_address_unit).
    layout_constexprs=lambda kernel, dtype, aligned: {"UNIT": 16 // _ELEMENT_BYTES[dtype] if aligned else 1},
    # Caching-allocator pointers (16-byte aligned) and row lengths N, K multiples of 16, as the
    # JIT specialises them for real layers.
    divisible=lambda signature: tuple(name for name in signature if name.endswith("_ptr") or name in ("N", "K")),
)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _prepare(x, lora_A, lora_B, order, offsets):
    x = x.contiguous()
    lora_A = [a.contiguous() for a in lora_A]
    lora_B = [b.contiguous() for b in lora_B]
    order = order.contiguous()
    offsets = [int(o) for o in offsets]
    return x, lora_A, lora_B, order, offsets


def segmented_lora_linear_fwd(x, weight, bias, lora_A, lora_B, scalings, dropout_p, order, offsets, seeds):
    """Forward of segmented_lora_linear.

    x ``[M, K]``, weight ``[N, K]`` (any strides), bias ``[N]`` or None; per adapter i of n:
    lora_A[i] ``[R_i, K]``, lora_B[i] ``[N, R_i]``, scalings[i], dropout_p[i], seeds[i] (an int64
    CPU tensor ``[n]``) and its rows ``order[offsets[i]:offsets[i + 1]]`` (order int64 on x's
    device, offsets n + 1 ints). Returns ``y = x W^T + b`` with ``s_i xa_i B_i^T`` added on adapter
    i's rows ``[M, N]`` and the list of ``xa_i = drop_i(x_i) A_i^T`` ``[M_i, R_i]``, all fresh
    tensors in x's dtype.
    """
    assert x.dim() == 2 and weight.dim() == 2 and len(lora_A) == len(lora_B) == len(offsets) - 1
    x, lora_A, lora_B, order, offsets = _prepare(x, lora_A, lora_B, order, offsets)
    n = len(lora_A)
    K = x.shape[1]
    N = weight.shape[0]
    seeds = seeds.tolist()
    y = F.linear(x, weight, bias)  # cuBLAS, all rows; a fresh [M, N] tensor
    xa = [torch.empty((offsets[i + 1] - offsets[i], lora_A[i].shape[0]), dtype=x.dtype, device=x.device)
          for i in range(n)]
    m_active = offsets[-1]
    if m_active == 0:
        return y, xa
    R = block_r(max(a.shape[0] for a in lora_A))
    # Every per-adapter tensor is addressed from lora_A[0] (kernel argument lr_ptr).
    table, unit = _segment_table(
        x.device, offsets, lora_A[0], {_F_A: lora_A, _F_B: lora_B, _F_XA: xa},
        {_F_RANK: [a.shape[0] for a in lora_A], _F_SEED: [philox_seed(s) for s in seeds]}, scalings, dropout_p)
    precision = dot_precision(x.dtype)
    max_seg = _max_seg(n)
    has_dropout = any(p > 0.0 for p in dropout_p)
    launch(
        seg_shrink_kernel, lambda meta: (_row_tiles(offsets, meta["BLOCK_M"]),),
        x, lora_A[0], order, table, n, K, m_active,
        interpreter_config=INTERPRETER_CONFIG["shrink"],
        HAS_DROPOUT=has_dropout, UNIT=unit, BLOCK_R=R, MAX_SEG=max_seg, DOT_PRECISION=precision,
    )
    if N > 0:
        launch(
            seg_expand_kernel, lambda meta: (_row_tiles(offsets, meta["BLOCK_M"]), _cdiv(N, meta["BLOCK_N"])),
            y, lora_A[0], order, table, n, N, m_active,
            interpreter_config=INTERPRETER_CONFIG["expand"],
            UNIT=unit, BLOCK_R=R, MAX_SEG=max_seg, DOT_PRECISION=precision,
        )
    return y, xa


def segmented_lora_linear_bwd(grad_out, x, weight, lora_A, lora_B, xa, scalings, dropout_p, order, offsets, seeds):
    """Backward of segmented_lora_linear for x and every lora_A[i], lora_B[i].

    Arguments as :func:`segmented_lora_linear_fwd`, plus grad_out ``[M, N]`` and the forward's xa
    list (the masks are regenerated from the seeds). Returns dx ``[M, K]`` (``dY W`` plus each
    adapter's low-rank term on its rows) and the lists dA ``[R_i, K]``, dB ``[N, R_i]`` (zeros for
    an adapter without rows), all fresh tensors in x's dtype.
    """
    assert grad_out.dim() == 2 and x.dim() == 2 and len(lora_A) == len(lora_B) == len(xa) == len(offsets) - 1
    x, lora_A, lora_B, order, offsets = _prepare(x, lora_A, lora_B, order, offsets)
    grad_out = grad_out.contiguous()
    xa = [t.contiguous() for t in xa]
    n = len(lora_A)
    K = x.shape[1]
    N = grad_out.shape[1]
    seeds = seeds.tolist()
    dx = torch.matmul(grad_out, weight)  # cuBLAS, all rows; a fresh [M, K] tensor
    ranks = [a.shape[0] for a in lora_A]
    da = [torch.empty((r, K), dtype=x.dtype, device=x.device) for r in ranks]
    db = [torch.empty((N, r), dtype=x.dtype, device=x.device) for r in ranks]
    if n == 0:
        return dx, da, db
    # fp32 partial sums of every dA_i, then every dB_i, in one zeroed workspace.
    da_off, db_off = [0], [0]
    for r in ranks:
        da_off.append(da_off[-1] + r * K)
        db_off.append(db_off[-1] + N * r)
    ws = torch.zeros(da_off[-1] + db_off[-1], dtype=torch.float32, device=x.device)
    da_ws, db_ws = ws[:da_off[-1]], ws[da_off[-1]:]
    table, unit = _segment_table(
        x.device, offsets, lora_A[0], {_F_A: lora_A, _F_B: lora_B, _F_XA: xa, _F_DA_OUT: da, _F_DB_OUT: db},
        {_F_RANK: ranks, _F_SEED: [philox_seed(s) for s in seeds], _F_DA_OFF: da_off[:-1], _F_DB_OFF: db_off[:-1]},
        scalings, dropout_p)
    m_active = offsets[-1]
    if m_active > 0:
        R = block_r(max(ranks))
        precision = dot_precision(x.dtype)
        max_seg = _max_seg(n)
        # dxa of every active row, in segment order, BLOCK_R columns (zero past R_i), x's dtype
        # (as eager PyTorch rounds it: it feeds the 16-bit dots of the dA/dx kernel).
        dxa = torch.empty((m_active, R), dtype=x.dtype, device=x.device)
        launch(
            seg_dy_kernel, lambda meta: (_row_tiles(offsets, meta["BLOCK_M"]),),
            grad_out, lora_A[0], order, table, dxa, db_ws, n, N, m_active,
            interpreter_config=INTERPRETER_CONFIG["dy"],
            UNIT=unit, BLOCK_R=R, MAX_SEG=max_seg, DOT_PRECISION=precision,
        )
        if K > 0:
            launch(
                seg_dadx_kernel,
                lambda meta: (_cdiv(K, meta["BLOCK_K"]), _row_tiles(offsets, meta["BLOCK_M"] * meta["M_TILES"])),
                x, lora_A[0], order, table, dxa, dx, da_ws, n, K, m_active,
                interpreter_config=INTERPRETER_CONFIG["dadx"],
                HAS_DROPOUT=any(p > 0.0 for p in dropout_p), UNIT=unit, BLOCK_R=R, MAX_SEG=max_seg,
                DOT_PRECISION=precision,
            )
    largest = max(r * max(N, K) for r in ranks)
    if largest > 0:
        launch(
            seg_cast_kernel, lambda meta: (_cdiv(largest, meta["BLOCK_SIZE"]), 2 * n),
            ws, lora_A[0], table, n, N, K, da_off[-1],
            interpreter_config=INTERPRETER_CONFIG["cast"], UNIT=unit,
        )
    return dx, da, db
