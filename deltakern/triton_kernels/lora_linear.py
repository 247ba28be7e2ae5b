"""Triton kernels and launchers of ``lora_linear``.

Shapes (2-D views): x ``[M, K]``, weight W ``[N, K]``, bias ``[N]``, lora_A ``[R, K]``,
lora_B ``[N, R]``, s = scaling, drop(x) = x * keep / (1 - dropout_p).

Forward, two kernels:
  1. shrink   ``xa = drop(x) A^T``                                   ``[M, R]``
  2. fwd GEMM ``out = x W^T + bias + s * xa B^T``                     ``[M, N]``
Backward, three kernels:
  3. dY       ``dxa = s * dY B`` and ``dB = s * dY^T xa`` from one read of dY
  4. dA       ``dA = dxa^T drop(x)``
  5. dx GEMM  ``dx = dY W + (dxa A) * keep / (1 - dropout_p)``

The dropout mask is never stored: kernels 1, 4 and 5 regenerate it from (seed, element)
with ``rng.dropout_keep``. All kernels take contiguous row-major tensors, so row strides are
the dimensions themselves and the unit stride is known at compile time (vectorised loads).
The rank is padded to ``BLOCK_R`` (a power of two >= 16) so that it can feed ``tl.dot``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltakern.triton_kernels.common import AotSpec, block_r, dot_precision, grouped_tile, launch
from deltakern.triton_kernels.rng import dropout_keep, philox_seed

# --------------------------------------------------------------------------------------------
# Autotune configurations (sm_80 / sm_90), one small config for the interpreter
# --------------------------------------------------------------------------------------------

# Every config below is checked by tests/triton_kernels/test_compile.py to compile without
# register spills on sm_80 and sm_90 for ranks up to 64 (BLOCK_R 64); larger ranks still run.
#
# The two GEMMs use the classic tensor-core tiles. 128x128 is the throughput tile for large
# problems; 128x64 / 64x128 keep more CTAs in flight when M or N is only a few tiles; BLOCK_K 32
# with 4 stages and 64 with 3 stages keep the cp.async / TMA pipeline full within shared memory
# (at most 104 KiB). 128x128 tiles run 8 warps: with 4, the low-rank prologue on top of the
# 128-register accumulator reached 241 registers at rank 16 and spilled at rank 64 on sm_80.
# GROUP_M = 8 walks tiles in column groups so the W tiles are reused from L2.
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=4),
]

# dx with dropout regenerates the mask for its whole output tile. Triton lowers the Philox
# rounds op by op over all of a thread's elements, so its live state grows with the elements
# per thread: at 64 (128x128 tiles on 256 threads) ptxas spills on sm_90 (224 B) and at 128
# (4 warps) on both targets (17 KB on sm_80). These tiles hold 32 elements per thread: at most
# 138 registers on sm_80 and 159 on sm_90 up to rank 64.
DX_DROPOUT_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=4),
]

# Shrink and dA stream x once and produce a thin [*, R] result, so they are memory bound: wide
# BLOCK_K tiles keep many bytes in flight per CTA, and BLOCK_M 32 / 64 give enough CTAs to fill
# the GPU when M is a few thousand rows. The x tile is also where the mask is drawn, so tiles
# keep to at most 32 elements per thread (see DX_DROPOUT_CONFIGS).
SHRINK_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_stages=4, num_warps=8),
]

# dY streams dY once; each CTA adds its [N, R] share of dB with atomics, so taller BLOCK_M
# (fewer CTAs, fewer atomics: (M / BLOCK_M) * N * R in total) is preferred over 32-row tiles.
# Its live set grows with the rank (dxa accumulator, xa and the [BLOCK_N, R] dB partial): at
# rank 64 these use 250-255 registers on sm_80, and 64x128 on 4 warps spilled 412 B.
DY_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=3, num_warps=8),
]

# dA reduces over M: a CTA owns a BLOCK_K column slab and M_TILES row tiles, then adds its
# [R, BLOCK_K] partial with atomics. Splitting M this way gives K / BLOCK_K * M / (BLOCK_M *
# M_TILES) CTAs, enough to fill the GPU even when K is only a few tiles, with few atomics.
DA_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64, "M_TILES": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128, "M_TILES": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64, "M_TILES": 4}, num_stages=3, num_warps=8),
]

# The interpreter runs each program in numpy, so one small config (the tl.dot minimum of 16 and
# a few tiles per launch) keeps the tests fast and still exercises multi-tile loops and edges.
# The QLoRA kernels reuse it and low_rank_tile.
INTERPRETER_CONFIG = {
    "gemm": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
    "shrink": {"BLOCK_M": 16, "BLOCK_K": 32},
    "dy": {"BLOCK_M": 16, "BLOCK_N": 32},
    "da": {"BLOCK_M": 16, "BLOCK_K": 32, "M_TILES": 2},
}


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

# The GEMM kernels take the low-rank term 16 ranks at a time (the mma K step), so its operand
# tiles stay small whatever the rank: at rank 64 the fwd 128x128x32 / 4-warp GEMM went from
# 408 B of spills (one rank-64 dot) to 8 B.
_R_CHUNK = tl.constexpr(16)


@triton.jit
def low_rank_tile(left_ptr, right_ptr, rows, cols, R, right_stride_r, right_stride_col,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of left[rows, :R] @ right[:R, cols].

    left is row-major [*, R]; right[r, c] sits at ``right_ptr + r * right_stride_r + c *
    right_stride_col`` (B^T for the forward, A for dx). The rank goes _R_CHUNK at a time.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.static_range(0, BLOCK_R, _R_CHUNK):
        offs_r = r0 + tl.arange(0, _R_CHUNK)
        r_ok = offs_r < R
        left = tl.load(left_ptr + rows[:, None] * R + offs_r[None, :], mask=r_ok[None, :], other=0.0)
        right = tl.load(right_ptr + offs_r[:, None] * right_stride_r + cols[None, :] * right_stride_col,
                        mask=r_ok[:, None], other=0.0)
        acc = tl.dot(left, right, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, xa_ptr, M, K, R, seed, dropout_p, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """xa[M, R] = drop(x)[M, K] @ A[R, K]^T; one program per BLOCK_M rows."""
    pid_m = tl.program_id(0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        element = offs_m[:, None] * K + offs_k[None, :]
        x = tl.load(x_ptr + element, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed, element, dropout_p), x, 0.0)
        a_t = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, a_t, acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        # 1/(1-dropout_p) is applied once to the fp32 sum instead of rounding every x * 1/(1-dropout_p).
        acc = acc * keep_scale
    tl.store(xa_ptr + offs_m[:, None] * R + offs_r[None, :], acc.to(xa_ptr.dtype.element_ty),
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, out_ptr, M, N, K, R, scaling,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[M, N] = x[M, K] @ W[N, K]^T + bias[N] + scaling * xa[M, R] @ B[N, R]^T."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Edge rows / columns are wrapped onto valid ones for the loads (their results are never
    # stored), so only the K edge needs a load mask inside the main loop.
    rows = offs_m % M
    cols = offs_n % N
    # The low-rank term starts the accumulator instead of ending it: the [BLOCK_M, BLOCK_N]
    # product of xa and B^T is then never live next to the main accumulator. As an epilogue,
    # the 128x128x32 / 4-warp GEMM spilled (20 B on sm_80, 900 B on sm_90); as a prologue, not.
    acc = low_rank_tile(xa_ptr, b_ptr, rows, cols, R, 1, R, BLOCK_M, BLOCK_N, BLOCK_R, DOT_PRECISION) * scaling
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * K + offs_k[:, None], mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x, w_t, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _lora_dy_kernel(
    dy_ptr, b_ptr, xa_ptr, dxa_ptr, db_ptr, M, N, R, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dxa[M, R] = s * dY[M, N] @ B[N, R]; db[N, R] (fp32, pre-zeroed) += s * dY^T @ xa[M, R].

    One program per BLOCK_M rows reads its rows of dY once and feeds both products.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    xa = tl.load(xa_ptr + offs_m[:, None] * R + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(dy, b, acc, input_precision=DOT_PRECISION)
        db = tl.dot(tl.trans(dy), xa, input_precision=DOT_PRECISION) * scaling
        # Relaxed ordering: the partial sums only need atomicity, not fences around them.
        tl.atomic_add(db_ptr + offs_n[:, None] * R + offs_r[None, :], db, mask=n_ok[:, None] & r_ok[None, :],
                      sem="relaxed")
    tl.store(dxa_ptr + offs_m[:, None] * R + offs_r[None, :], (acc * scaling).to(dxa_ptr.dtype.element_ty),
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_da_kernel(
    dxa_ptr, x_ptr, da_ptr, M, K, R, seed, dropout_p, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    M_TILES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """da[R, K] (fp32, pre-zeroed) += dxa[M, R]^T @ drop(x)[M, K] over this program's rows.

    Grid: (K / BLOCK_K, M / (BLOCK_M * M_TILES)).
    """
    pid_k = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    k_ok = offs_k < K
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for t in range(0, M_TILES):
        offs_m = (pid_s * M_TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        dxa_t = tl.load(dxa_ptr + offs_r[:, None] + offs_m[None, :] * R, mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        element = offs_m[:, None] * K + offs_k[None, :]
        x = tl.load(x_ptr + element, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed, element, dropout_p), x, 0.0)
        acc = tl.dot(dxa_t, x, acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], acc, mask=r_ok[:, None] & k_ok[None, :],
                  sem="relaxed")


@triton.jit
def _lora_dx_kernel(
    dy_ptr, w_ptr, dxa_ptr, a_ptr, dx_ptr, M, N, K, R, seed, dropout_p, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dx[M, K] = dY[M, N] @ W[N, K] + (dxa[M, R] @ A[R, K]) * keep * keep_scale.

    GEMM naming: the output tile is BLOCK_M x BLOCK_N over (M, K); BLOCK_K steps through N.
    """
    pid_m, pid_n = grouped_tile(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % K
    # Low-rank term and mask first, for the register reason given in _lora_fwd_kernel; the mask
    # is regenerated here from (seed, element) rather than read back from memory.
    acc = low_rank_tile(dxa_ptr, a_ptr, rows, cols, R, K, 1, BLOCK_M, BLOCK_N, BLOCK_R, DOT_PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, offs_m[:, None] * K + offs_n[None, :], dropout_p)
        acc = tl.where(keep, acc * keep_scale, 0.0)
    for n0 in range(0, N, BLOCK_K):
        # int64: N * K may pass 2**31 (an LM head), unlike the other loop-index products here.
        offs_red = n0 + tl.arange(0, BLOCK_K).to(tl.int64)
        red_ok = offs_red < N
        dy = tl.load(dy_ptr + rows[:, None] * N + offs_red[None, :], mask=red_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_red[:, None] * K + cols[None, :], mask=red_ok[:, None], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    tl.store(dx_ptr + offs_m[:, None] * K + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < K)[None, :])


lora_shrink_kernel = triton.autotune(SHRINK_CONFIGS, key=["M", "K", "R"])(_lora_shrink_kernel)
lora_fwd_kernel = triton.autotune(GEMM_CONFIGS, key=["M", "N", "K"])(_lora_fwd_kernel)
# The atomically accumulated buffers are zeroed before every timing run of the autotuner.
lora_dy_kernel = triton.autotune(DY_CONFIGS, key=["M", "N", "R"], reset_to_zero=["db_ptr"])(_lora_dy_kernel)
lora_da_kernel = triton.autotune(DA_CONFIGS, key=["M", "K", "R"], reset_to_zero=["da_ptr"])(_lora_da_kernel)
lora_dx_kernel = triton.autotune(GEMM_CONFIGS, key=["M", "N", "K"])(_lora_dx_kernel)
lora_dx_dropout_kernel = triton.autotune(DX_DROPOUT_CONFIGS, key=["M", "N", "K"])(_lora_dx_kernel)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compiles (triton_kernels.aot)
# --------------------------------------------------------------------------------------------

# The padded rank blocks compiled: BLOCK_R 16 covers r <= 16, the usual case, up to 128 (r in
# (64, 128]). SWEEP_RANKS, 16 and the largest common rank 64, are where every autotune config is
# compiled; 64 is the register high-water mark the configs were chosen to fit without spills.
RANKS = (16, 32, 64, 128)
SWEEP_RANKS = (16, 64)


def _aot_signatures(dtype: str, flags: dict) -> dict:
    """Runtime argument types of each kernel for ``dtype`` inputs."""
    t = f"*{dtype}"
    rng = {"seed": "i64", "dropout_p": "fp32", "keep_scale": "fp32"}
    dx = {"dy_ptr": t, "w_ptr": t, "dxa_ptr": t, "a_ptr": t, "dx_ptr": t,
          "M": "i32", "N": "i32", "K": "i32", "R": "i32", **rng}
    return {
        "shrink": {"x_ptr": t, "a_ptr": t, "xa_ptr": t, "M": "i32", "K": "i32", "R": "i32", **rng},
        "fwd": {"x_ptr": t, "w_ptr": t, "bias_ptr": t, "xa_ptr": t, "b_ptr": t, "out_ptr": t,
                "M": "i32", "N": "i32", "K": "i32", "R": "i32", "scaling": "fp32"},
        "dy": {"dy_ptr": t, "b_ptr": t, "xa_ptr": t, "dxa_ptr": t, "db_ptr": "*fp32",
               "M": "i32", "N": "i32", "R": "i32", "scaling": "fp32"},
        "da": {"dxa_ptr": t, "x_ptr": t, "da_ptr": "*fp32", "M": "i32", "K": "i32", "R": "i32", **rng},
        "dx": dx,
        "dx_dropout": dx,
    }


AOT = AotSpec(
    # dx has one autotuner per dropout setting because dropout changes which tiles fit in registers.
    kernels={
        "shrink": (lora_shrink_kernel, {"HAS_DROPOUT": (True, False)}),
        "fwd": (lora_fwd_kernel, {"HAS_BIAS": (True, False)}),
        "dy": (lora_dy_kernel, {}),
        "da": (lora_da_kernel, {"HAS_DROPOUT": (True, False)}),
        "dx": (lora_dx_kernel, {"HAS_DROPOUT": (False,)}),
        "dx_dropout": (lora_dx_dropout_kernel, {"HAS_DROPOUT": (True,)}),
    },
    signatures=_aot_signatures,
    variants=RANKS,
    sweep_variants=SWEEP_RANKS,
    variant_tag="r",
    variant_constexprs=lambda kernel, rank: {"BLOCK_R": block_r(rank)},
    # Pointers from the caching allocator are 16-byte aligned, and the row lengths (K, N) of
    # real layers are multiples of 16: the specialisation the JIT makes at run time.
    divisible=lambda signature: tuple(name for name in signature if name.endswith("_ptr") or name in ("N", "K")),
)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def lora_shrink(x, lora_A, dropout_p: float, seed: int):
    """Kernel 1: ``xa = drop(x) A^T`` ``[M, R]`` in x's dtype, for contiguous x ``[M, K]`` and
    lora_A ``[R, K]``; drop keeps element (m, k) by Philox(seed) and scales by 1/(1-dropout_p).
    Shared with the QLoRA op, whose low-rank branch is this op's."""
    M, K = x.shape
    R = lora_A.shape[0]
    xa = torch.empty((M, R), dtype=x.dtype, device=x.device)
    launch(
        lora_shrink_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
        x, lora_A, xa, M, K, R, philox_seed(seed), dropout_p, 1.0 / (1.0 - dropout_p),
        interpreter_config=INTERPRETER_CONFIG["shrink"],
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_R=block_r(R), DOT_PRECISION=dot_precision(x.dtype),
    )
    return xa


def lora_low_rank_backward(grad_out, x, lora_B, xa, scaling: float, dropout_p: float, seed: int):
    """Kernels 3 and 4 on contiguous tensors: ``dxa = s * dY B`` ``[M, R]`` in x's dtype, and
    ``dA = dxa^T drop(x)`` ``[R, K]`` and ``dB = s * dY^T xa`` ``[N, R]`` accumulated in fp32.
    Returns (dxa, dA, dB); dx's GEMM is the caller's. Shared with the QLoRA op."""
    M, K = x.shape
    N, R = grad_out.shape[1], xa.shape[1]
    precision = dot_precision(x.dtype)
    # dxa is kept in x's dtype, as eager PyTorch rounds it: it feeds the 16-bit tensor-core dots
    # of the dA and dx kernels.
    dxa = torch.empty((M, R), dtype=x.dtype, device=x.device)
    # dA and dB are sums over M split across CTAs: accumulated in fp32, cast at the end.
    db = torch.zeros((N, R), dtype=torch.float32, device=x.device)
    launch(
        lora_dy_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
        grad_out, lora_B, xa, dxa, db, M, N, R, scaling,
        interpreter_config=INTERPRETER_CONFIG["dy"],
        BLOCK_R=block_r(R), DOT_PRECISION=precision,
    )
    return dxa, lora_da(dxa, x, dropout_p, seed), db


def lora_da(dxa, x, dropout_p: float, seed: int):
    """Kernel 4 on contiguous tensors: ``dA = dxa^T drop(x)`` ``[R, K]`` in fp32 (a sum over M
    split across CTAs), the mask regenerated from ``seed``. Shared with the DoRA op."""
    M, K = x.shape
    R = dxa.shape[1]
    da = torch.zeros((R, K), dtype=torch.float32, device=x.device)
    launch(
        lora_da_kernel,
        lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(M, meta["BLOCK_M"] * meta["M_TILES"])),
        dxa, x, da, M, K, R, philox_seed(seed), dropout_p, 1.0 / (1.0 - dropout_p),
        interpreter_config=INTERPRETER_CONFIG["da"],
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_R=block_r(R), DOT_PRECISION=dot_precision(x.dtype),
    )
    return da


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int):
    """Forward of lora_linear.

    x ``[M, K]``, weight ``[N, K]``, bias ``[N]`` or None, lora_A ``[R, K]``, lora_B ``[N, R]``.
    Returns ``out = x W^T + bias + scaling * xa B^T`` ``[M, N]`` and ``xa = drop(x) A^T``
    ``[M, R]``, both in x's dtype; drop keeps element (m, k) by Philox(seed) and scales by
    1/(1-dropout_p). xa is what backward needs besides x; the mask is not returned.
    """
    assert x.dim() == 2 and weight.dim() == 2 and lora_A.dim() == 2 and lora_B.dim() == 2
    x, weight, lora_A, lora_B = x.contiguous(), weight.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    xa = lora_shrink(x, lora_A, dropout_p, seed)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    launch(
        lora_fwd_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
        x, weight, bias, xa, lora_B, out, M, N, K, R, scaling,
        interpreter_config=INTERPRETER_CONFIG["gemm"],
        HAS_BIAS=bias is not None, BLOCK_R=block_r(R), DOT_PRECISION=dot_precision(x.dtype),
    )
    return out, xa


def lora_linear_bwd(grad_out, x, weight, lora_A, lora_B, xa, scaling: float, dropout_p: float, seed: int):
    """Backward of lora_linear for x, lora_A and lora_B.

    grad_out ``[M, N]``, x ``[M, K]``, weight ``[N, K]``, lora_A ``[R, K]``, lora_B ``[N, R]``,
    xa ``[M, R]`` from the forward; scaling, dropout_p and seed as in the forward (the mask is
    regenerated). Returns dx ``[M, K]``, dA ``[R, K]``, dB ``[N, R]`` in x's dtype.
    """
    assert grad_out.dim() == 2 and x.dim() == 2 and xa.dim() == 2
    grad_out, x, weight = grad_out.contiguous(), x.contiguous(), weight.contiguous()
    lora_A, lora_B, xa = lora_A.contiguous(), lora_B.contiguous(), xa.contiguous()
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    has_dropout = dropout_p > 0.0
    dxa, da, db = lora_low_rank_backward(grad_out, x, lora_B, xa, scaling, dropout_p, seed)
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
    launch(
        lora_dx_dropout_kernel if has_dropout else lora_dx_kernel,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),),
        grad_out, weight, dxa, lora_A, dx, M, N, K, R, philox_seed(seed), dropout_p, 1.0 / (1.0 - dropout_p),
        interpreter_config=INTERPRETER_CONFIG["gemm"],
        HAS_DROPOUT=has_dropout, BLOCK_R=block_r(R), DOT_PRECISION=dot_precision(x.dtype),
    )
    return dx, da.to(x.dtype), db.to(x.dtype)
