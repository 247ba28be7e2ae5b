"""Triton kernels and launchers of ``adapter``.

Shapes (2-D views, contiguous, one dtype): h ``[M, N]`` (N = d, the hidden size), w_down
``[R, N]``, b_down ``[R]``, w_up ``[N, R]``, b_up ``[N]``, residual ``[M, N]`` (h when None),
s = scaling, act = the activation of code ``ACTIVATION`` (``deltakern.activations.CODES``: relu,
gelu (erf), gelu_tanh, silu, tanh), a = act(pre).

Forward, two kernels:
  1. down  ``pre = h w_down^T + b_down``, and act in its epilogue: ``a = act(pre)``   ``[M, R]`` x 2
  2. up    ``out = residual + s * (a w_up^T + b_up)``, written once                   ``[M, N]``
Backward, three kernels:
  3. dz    ``dpre = (s * dOut w_up) * act'(pre)`` from one read of dOut, act' recomputed from
           pre; also ``a = act(pre)`` and ``db_down += colsum(dpre)``                 ``[M, R]`` x 2
  4. dh    ``dh = dpre w_down (+ dOut when residual is h)``, and from the same dOut tiles
           ``dw_up += s * (a^T dOut)^T`` and ``db_up += s * colsum(dOut)``             ``[M, N]``
  5. dwd   ``dw_down += dpre^T h``                                                      ``[R, N]``

Saved for backward (by the op): h and pre. a = act(pre) is a temporary ``[M, R]`` buffer inside
forward and inside backward, written once by the kernel that evaluates the activation and read
by the GEMM after it, so no tile evaluates the activation twice (see adapter_fwd).

Passes over ``[M, N]``: forward reads h (kernel 1) and the residual (kernel 2) and writes out
once; backward reads dOut twice (kernel 3 needs a whole row of dOut before dpre exists; kernel 4
for dh's residual term and dw_up), h once (kernel 5) and writes dh once. The weight and bias
gradients add no pass of their own: each rides on a read the backward needs anyway. dw_up,
dw_down, db_up and db_down are sums over M split across programs and added with fp32 atomics
(so their low bits depend on the order programs finish).

The bottleneck R is padded to ``BLOCK_R`` (a power of two >= 16, tl.dot's smallest dimension)
where it is a dimension of a tile (kernels 1, 3, 4, 5); kernel 2 walks R
``UP_BLOCK_R`` at a time. Row and column edges of loads are wrapped onto valid rows / columns
(``% M``, ``% N``, ``% R``) where the wrapped values only reach elements that are never stored, so
only the reduction edge needs a load mask; loads feeding a sum over M are masked instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltakern.activations import CODES
from deltakern.triton_kernels.common import AotSpec, block_r, dot_precision, grouped_tile, launch

# --------------------------------------------------------------------------------------------
# Autotune configurations (sm_80 / sm_90), one small config for the interpreter
# --------------------------------------------------------------------------------------------

# Every config below is checked by tests/triton_kernels/test_compile.py to compile without
# register spills on sm_80 and sm_90, fp16 and bf16, for bottlenecks 16 and 64 (BLOCK_R 64 is
# the register high-water mark), down and dz with both gelus. Figures after each config are the
# most registers ptxas -v reported at BLOCK_R 64, "sm_80 / sm_90", over fp16 / bf16, all five
# activations, and R both unaligned and a multiple of 16 (the JIT specialises the two apart; the
# compile test takes R unaligned). sm_80 is the tight target: mma.sync keeps
# both dot operands in registers, where sm_90's wgmma reads one from shared memory.

# NOTE (down): h is streamed once into a thin [BLOCK_M, R] result, so the kernel is memory bound:
# wide BLOCK_K tiles keep many bytes in flight per CTA, and 32-row tiles give M / 32 CTAs, enough
# to fill 108 / 132 SMs from M = 4096 rows. The activation is its epilogue, once per element of
# pre. At BLOCK_R 16 every config takes at most 64 registers.
DOWN_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_stages=3, num_warps=4),  # 128 / 96
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_stages=3, num_warps=4),  # 198 / 176 (gelu)
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_stages=3, num_warps=8),  # 120 / 94
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_stages=3, num_warps=8),  # 184 / 172 (gelu)
]

# NOTE (up): the reduction is R, so the kernel is a streaming epilogue: read the residual, write
# out, [BLOCK_M, BLOCK_N] at a time. It walks R 16 ranks (one mma K step) at a time whatever r is:
# a's and w_up's rows are unaligned for most r, so every element is its own load with its own
# 64-bit address, and one whole-rank chunk at r = 64 took 248-255 registers (64x64 / 4 warps) and
# spilled at 64x128 / 4 warps (248 B on sm_80, 200 B on sm_90). With 16-rank chunks the figures
# below hold for every r. 32 elements per thread (64x64 / 4 warps, 128x64 and 64x128 / 8 warps)
# keep registers near 100 for occupancy; 128x128 / 8 warps moves the most bytes per CTA.
# GROUP_M = 8 keeps a column group's w_up rows in L2.
UP_BLOCK_R = 16
UP_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_stages=2, num_warps=8),  # 186 / 178
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_stages=2, num_warps=8),  # 109 / 108
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_stages=2, num_warps=8),  # 128 / 111
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_stages=2, num_warps=4),  # 96 / 96
]

# NOTE (dz): a program owns BLOCK_M rows and walks all N columns of dOut once, accumulating
# [BLOCK_M, R]; act', act and the db_down column sum are its epilogue. The grid is M / BLOCK_M,
# so 32-row tiles matter (64 rows give only 64 CTAs at M = 4096). It keeps no [BLOCK_N, R]
# weight-gradient partial per column tile (dw_up is summed in kernel 4 over M_TILES row tiles
# before its atomics, 1/M_TILES of the atomics). The epilogue's live set grows
# with the activation (gelu and gelu_tanh are the heaviest) and BLOCK_M * BLOCK_R per thread:
# 128-row tiles reached 249-255 registers on sm_90 and spilled at 128x32 / 8 warps (12 B), and
# 64x64 / 4 warps spilled 24 B on sm_90 with gelu, so the 64-row tiles run 8 warps.
DZ_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_stages=4, num_warps=4),  # 161 / 167
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_stages=4, num_warps=8),  # 128 / 98
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_stages=4, num_warps=8),  # 156 / 118
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_stages=3, num_warps=8),  # 186 / 160
]

# NOTE (dh, dwd): the weight gradients are split-K GEMMs over M with fp32 atomics, not plain tiled
# GEMMs: dw_up and dw_down are only [N, R], so a GEMM over their output tiles would have N / 64
# CTAs (64 at N = 4096), each with an M-long loop, and would read dOut and h in passes of their
# own. Here a program owns a BLOCK_N column slab and M_TILES row tiles, keeps its partial sums in
# registers across the row tiles and adds them once at the end: N / BLOCK_N * M / (BLOCK_M *
# M_TILES) CTAs (512 at M = 8192, N = 4096, 64x64x8), (M / (BLOCK_M * M_TILES)) * (2 N R + N)
# atomics in all. M_TILES = 2 configs give 4x the CTAs when M is short.
#
# dh also computes the dh tile per row tile (a GEMM whose reduction is R, from w_down's [R,
# BLOCK_N] slab loaded once per program; dOut added in the epilogue), so dOut is read once for
# dh, dw_up and db_up. dw_up is accumulated transposed, a^T [R, BLOCK_M] @ dOut [BLOCK_M, BLOCK_N]
# with a read transposed from memory: dOut^T @ a (the dOut tile transposed in registers) took
# up to 255 registers at 64x64x8 and 64x128x8 / 8 warps on sm_80 (now 202 and 204). dw_down has
# its own kernel (dwd) because h is read only for it: one kernel doing dh, dw_up and dw_down held
# three accumulators, reached 255 registers on sm_80 in every tile tried and spilled in most
# (92-408 B at BLOCK_R 64). 128x64x4 / 8 warps spills in dh alone (16 B on sm_80 at BLOCK_R
# 64); it stays in dwd, whose live set is one [BLOCK_R, BLOCK_N] accumulator and its two
# operand tiles.
DH_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "M_TILES": 8}, num_stages=3, num_warps=8),  # 202 / 112
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "M_TILES": 8}, num_stages=3, num_warps=8),  # 204 / 171
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "M_TILES": 8}, num_stages=3, num_warps=8),  # 168 / 132
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "M_TILES": 8}, num_stages=3, num_warps=4),  # 180 / 130
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "M_TILES": 2}, num_stages=3, num_warps=8),  # 213 / 104
]
DWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "M_TILES": 8}, num_stages=4, num_warps=4),  # 142 / 167
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "M_TILES": 8}, num_stages=3, num_warps=8),  # 144 / 72
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "M_TILES": 4}, num_stages=3, num_warps=8),  # 128 / 128
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "M_TILES": 2}, num_stages=4, num_warps=4),  # 150 / 168
]

# The interpreter runs each program in numpy, so one small config (the tl.dot minimum of 16 and
# a few tiles per launch) keeps the tests fast and still exercises multi-tile loops and edges.
_INTERPRETER_CONFIG = {
    "down": {"BLOCK_M": 16, "BLOCK_K": 32},
    "up": {"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 2},
    "dz": {"BLOCK_M": 16, "BLOCK_N": 32},
    "dh": {"BLOCK_M": 16, "BLOCK_N": 32, "M_TILES": 2},
    "dwd": {"BLOCK_M": 16, "BLOCK_N": 32, "M_TILES": 2},
}


# --------------------------------------------------------------------------------------------
# Activations (fp32 in, fp32 out); the code is a constexpr, so only one branch is compiled
# --------------------------------------------------------------------------------------------

# Constants are literals in the functions: a tl.constexpr global times a tensor stays a constexpr
# under the interpreter, which then breaks tl.abs / tl.exp on it. The activation codes are
# tl.constexpr globals all the same: they are only compared with the ACTIVATION constexpr, which
# both the interpreter and the compiler resolve before any tensor is touched.
RELU = tl.constexpr(CODES["relu"])
GELU = tl.constexpr(CODES["gelu"])
GELU_TANH = tl.constexpr(CODES["gelu_tanh"])
SILU = tl.constexpr(CODES["silu"])
TANH = tl.constexpr(CODES["tanh"])


@triton.jit
def _tanh(x):
    """tanh to ~2 ulp in fp32 from exp alone (the interpreter cannot run libdevice calls).

    |x| < 0.625: the odd polynomial of Cephes' tanhf (1 - 2 / (e^2x + 1) cancels near 0);
    otherwise (1 - e^-2|x|) / (1 + e^-2|x|) with the sign of x, which never overflows.
    """
    z = x * x
    poly = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
            - 3.33332819422e-1)
    small = x + x * z * poly
    e = tl.exp(-2.0 * tl.abs(x))
    large = (1.0 - e) / (1.0 + e)
    large = tl.where(x < 0.0, -large, large)
    return tl.where(tl.abs(x) < 0.625, small, large)


@triton.jit
def _act(x, ACTIVATION: tl.constexpr):
    """act(x) for the activation code (relu, gelu, gelu_tanh, silu, tanh)."""
    if ACTIVATION == RELU:
        y = tl.maximum(x, 0.0)
    elif ACTIVATION == GELU:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # x Phi(x), 1/sqrt(2)
    elif ACTIVATION == GELU_TANH:
        # sqrt(2 / pi) = 0.7978845608028654
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACTIVATION == SILU:
        y = x * tl.sigmoid(x)
    else:
        tl.static_assert(ACTIVATION == TANH, "ACTIVATION is not a code of deltakern.activations.CODES")
        y = _tanh(x)
    return y


@triton.jit
def _act_grad(x, ACTIVATION: tl.constexpr):
    """act'(x) for the activation code, as PyTorch's backward formulas give it."""
    if ACTIVATION == RELU:
        g = tl.where(x <= 0.0, 0.0, 1.0)  # 1 at NaN, as torch's threshold_backward
    elif ACTIVATION == GELU:
        # Phi(x) + x phi(x); 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327
        g = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACTIVATION == GELU_TANH:
        # d/dx 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        g = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACTIVATION == SILU:
        sig = tl.sigmoid(x)
        g = sig * (1.0 + x * (1.0 - sig))
    else:
        tl.static_assert(ACTIVATION == TANH, "ACTIVATION is not a code of deltakern.activations.CODES")
        t = _tanh(x)
        g = 1.0 - t * t
    return g


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _adapter_down_kernel(
    h_ptr, wd_ptr, bd_ptr, pre_ptr, act_ptr, M, N, R,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """pre[M, R] = h[M, N] @ w_down[R, N]^T + b_down[R]; act[M, R] = act(pre).

    One program per BLOCK_M rows; act is computed from pre as stored (rounded to the I/O dtype),
    the value backward recomputes it from.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m % M
    r_wrap = offs_r % R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < N
        h = tl.load(h_ptr + rows[:, None] * N + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        wd_t = tl.load(wd_ptr + r_wrap[None, :] * N + offs_k[:, None], mask=k_ok[:, None], other=0.0)
        acc = tl.dot(h, wd_t, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bd_ptr + r_wrap).to(tl.float32)[None, :]
    out_mask = (offs_m < M)[:, None] & (offs_r < R)[None, :]
    out_offs = offs_m[:, None] * R + offs_r[None, :]
    pre = acc.to(pre_ptr.dtype.element_ty)
    tl.store(pre_ptr + out_offs, pre, mask=out_mask)
    a = _act(pre.to(tl.float32), ACTIVATION)
    tl.store(act_ptr + out_offs, a.to(act_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _adapter_up_kernel(
    act_ptr, wu_ptr, bu_ptr, res_ptr, out_ptr, M, N, R, scaling,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[M, N] = residual[M, N] + scaling * (act[M, R] @ w_up[N, R]^T + b_up[N]).

    The rank is walked BLOCK_R (UP_BLOCK_R) at a time, so registers do not grow with R.
    """
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        a = tl.load(act_ptr + rows[:, None] * R + offs_r[None, :], mask=r_ok[None, :], other=0.0)
        wu_t = tl.load(wu_ptr + cols[None, :] * R + offs_r[:, None], mask=r_ok[:, None], other=0.0)
        acc = tl.dot(a, wu_t, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bu_ptr + cols).to(tl.float32)[None, :]
    res = tl.load(res_ptr + rows[:, None] * N + cols[None, :]).to(tl.float32)
    out = res + scaling * acc
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _adapter_dz_kernel(
    dy_ptr, wu_ptr, pre_ptr, dpre_ptr, act_ptr, dbd_ptr, M, N, R, scaling,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dpre[M, R] = (s * dOut[M, N] @ w_up[N, R]) * act'(pre); act[M, R] = act(pre);
    db_down[R] (fp32, pre-zeroed) += colsum(dpre) over this program's rows.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m % M
    r_wrap = offs_r % R
    m_ok = offs_m < M
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(dy_ptr + rows[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0.0)
        wu = tl.load(wu_ptr + offs_n[:, None] * R + r_wrap[None, :], mask=n_ok[:, None], other=0.0)
        acc = tl.dot(dy, wu, acc, input_precision=DOT_PRECISION)
    mask = m_ok[:, None] & r_ok[None, :]
    offs = offs_m[:, None] * R + offs_r[None, :]
    pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Rows past M and padded ranks are zeroed: they must not reach the db_down sum.
    dpre = tl.where(mask, (acc * scaling) * _act_grad(pre, ACTIVATION), 0.0)
    tl.store(dpre_ptr + offs, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
    tl.store(act_ptr + offs, _act(pre, ACTIVATION).to(act_ptr.dtype.element_ty), mask=mask)
    # Relaxed ordering: the partial sums only need atomicity, not fences around them.
    tl.atomic_add(dbd_ptr + offs_r, tl.sum(dpre, axis=0), mask=r_ok, sem="relaxed")


@triton.jit
def _adapter_dh_kernel(
    dy_ptr, wd_ptr, dpre_ptr, act_ptr, dh_ptr, dwu_ptr, dbu_ptr, M, N, R, scaling,
    RESIDUAL_IS_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    M_TILES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dh[M, N] = dpre[M, R] @ w_down[R, N] (+ dOut when RESIDUAL_IS_H), and from the same dOut
    tiles, over this program's rows, into fp32 pre-zeroed buffers: dw_up[N, R] += s * (act^T @
    dOut)^T and db_up[N] += s * colsum(dOut).

    Grid: (N / BLOCK_N, M / (BLOCK_M * M_TILES)).
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    cols = offs_n % N
    n_ok = offs_n < N
    r_ok = offs_r < R
    # Padded ranks of w_down are wrapped (finite); dpre's padded ranks are loaded as 0.
    wd = tl.load(wd_ptr + (offs_r % R)[:, None] * N + cols[None, :])
    acc_dwu = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    acc_dbu = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(0, M_TILES):
        offs_m = (pid_s * M_TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        mr_mask = m_ok[:, None] & r_ok[None, :]
        mr_offs = offs_m[:, None] * R + offs_r[None, :]
        dpre = tl.load(dpre_ptr + mr_offs, mask=mr_mask, other=0.0)
        a_t = tl.load(act_ptr + offs_r[:, None] + offs_m[None, :] * R, mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        # Rows past M are loaded as 0: they feed the sums over M.
        dy = tl.load(dy_ptr + offs_m[:, None] * N + cols[None, :], mask=m_ok[:, None], other=0.0)
        dh = tl.dot(dpre, wd, input_precision=DOT_PRECISION)
        if RESIDUAL_IS_H:
            dh += dy.to(tl.float32)
        tl.store(dh_ptr + offs_m[:, None] * N + offs_n[None, :], dh.to(dh_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
        acc_dwu = tl.dot(a_t, dy, acc_dwu, input_precision=DOT_PRECISION)
        acc_dbu += tl.sum(dy.to(tl.float32), axis=0)
    # Relaxed ordering: the partial sums only need atomicity, not fences around them.
    tl.atomic_add(dwu_ptr + offs_n[None, :] * R + offs_r[:, None], acc_dwu * scaling,
                  mask=n_ok[None, :] & r_ok[:, None], sem="relaxed")
    tl.atomic_add(dbu_ptr + offs_n, acc_dbu * scaling, mask=n_ok, sem="relaxed")


@triton.jit
def _adapter_dwd_kernel(
    dpre_ptr, h_ptr, dwd_ptr, M, N, R,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, M_TILES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dw_down[R, N] (fp32, pre-zeroed) += dpre[M, R]^T @ h[M, N] over this program's rows.

    Grid: (N / BLOCK_N, M / (BLOCK_M * M_TILES)).
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    cols = offs_n % N
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for t in range(0, M_TILES):
        offs_m = (pid_s * M_TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        # dpre is read transposed straight from memory; rows past M and padded ranks load as 0,
        # so h's rows past M (wrapped onto valid ones) add nothing.
        dpre_t = tl.load(dpre_ptr + offs_r[:, None] + offs_m[None, :] * R, mask=r_ok[:, None] & m_ok[None, :],
                         other=0.0)
        h = tl.load(h_ptr + (offs_m % M)[:, None] * N + cols[None, :])
        acc = tl.dot(dpre_t, h, acc, input_precision=DOT_PRECISION)
    tl.atomic_add(dwd_ptr + offs_r[:, None] * N + offs_n[None, :], acc,
                  mask=r_ok[:, None] & (offs_n < N)[None, :], sem="relaxed")


adapter_down_kernel = triton.autotune(DOWN_CONFIGS, key=["M", "N", "R"])(_adapter_down_kernel)
adapter_up_kernel = triton.autotune(UP_CONFIGS, key=["M", "N", "R"])(_adapter_up_kernel)
# The atomically accumulated buffers are zeroed before every timing run of the autotuner.
adapter_dz_kernel = triton.autotune(DZ_CONFIGS, key=["M", "N", "R"], reset_to_zero=["dbd_ptr"])(_adapter_dz_kernel)
adapter_dh_kernel = triton.autotune(DH_CONFIGS, key=["M", "N", "R"],
                                    reset_to_zero=["dwu_ptr", "dbu_ptr"])(_adapter_dh_kernel)
adapter_dwd_kernel = triton.autotune(DWD_CONFIGS, key=["M", "N", "R"], reset_to_zero=["dwd_ptr"])(_adapter_dwd_kernel)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compiles (triton_kernels.aot)
# --------------------------------------------------------------------------------------------

# Padded bottleneck blocks compiled: 16 (r <= 16) up to 128. SWEEP_BOTTLENECKS, where every
# autotune config is compiled: 16 and 64, the usual bottleneck of BERT-size adapters and the
# register high-water mark the configs were chosen to fit without spills.
BOTTLENECKS = (16, 32, 64, 128)
SWEEP_BOTTLENECKS = (16, 64)


def _aot_signatures(dtype: str, flags: dict) -> dict:
    """Runtime argument types of each kernel for ``dtype`` inputs."""
    t = f"*{dtype}"
    sizes = {"M": "i32", "N": "i32", "R": "i32"}
    down = {"h_ptr": t, "wd_ptr": t, "bd_ptr": t, "pre_ptr": t, "act_ptr": t, **sizes}
    dz = {"dy_ptr": t, "wu_ptr": t, "pre_ptr": t, "dpre_ptr": t, "act_ptr": t, "dbd_ptr": "*fp32",
          **sizes, "scaling": "fp32"}
    return {
        "down": down,
        "up": {"act_ptr": t, "wu_ptr": t, "bu_ptr": t, "res_ptr": t, "out_ptr": t, **sizes, "scaling": "fp32"},
        # The weight and bias gradients are fp32 buffers summed with atomics.
        "dz": dz,
        "dh": {"dy_ptr": t, "wd_ptr": t, "dpre_ptr": t, "act_ptr": t, "dh_ptr": t,
               "dwu_ptr": "*fp32", "dbu_ptr": "*fp32", **sizes, "scaling": "fp32"},
        "dwd": {"dpre_ptr": t, "h_ptr": t, "dwd_ptr": "*fp32", **sizes},
    }


# Every activation where a kernel evaluates it, the gelus first: the activations with the most
# live state (erf's polynomial; tanh, a cubic and their products).
_ACTIVATIONS = tuple(CODES[name] for name in ("gelu", "gelu_tanh", "relu", "silu", "tanh"))
AOT = AotSpec(
    # Every flag each way, the heaviest first: biases present, the residual gradient added.
    kernels={
        "down": (adapter_down_kernel, {"HAS_BIAS": (True, False), "ACTIVATION": _ACTIVATIONS}),
        "up": (adapter_up_kernel, {"HAS_BIAS": (True, False)}),
        "dz": (adapter_dz_kernel, {"ACTIVATION": _ACTIVATIONS}),
        "dh": (adapter_dh_kernel, {"RESIDUAL_IS_H": (True, False)}),
        "dwd": (adapter_dwd_kernel, {}),
    },
    signatures=_aot_signatures,
    variants=BOTTLENECKS,
    sweep_variants=SWEEP_BOTTLENECKS,
    variant_tag="r",
    # The up kernel walks the bottleneck UP_BLOCK_R ranks at a time; the others hold all of it.
    variant_constexprs=lambda kernel, r: {"BLOCK_R": UP_BLOCK_R if kernel == "up" else block_r(r)},
    # Pointers from the caching allocator are 16-byte aligned and the hidden size d of real
    # models is a multiple of 16; the bottleneck r is left unspecialised (8, 48 and 100 are all
    # used).
    divisible=lambda signature: tuple(name for name in signature if name.endswith("_ptr") or name == "N"),
)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def adapter_fwd(h, w_down, b_down, w_up, b_up, residual, activation: int, scaling: float):
    """Forward of adapter.

    h ``[M, d]``, w_down ``[r, d]``, b_down ``[r]`` or None, w_up ``[d, r]``, b_up ``[d]`` or
    None, residual ``[M, d]`` or None (then h); one dtype. activation is a code of
    ``deltakern.activations.CODES``. Returns ``out = residual + scaling * (act(pre) w_up^T +
    b_up)`` ``[M, d]`` and ``pre = h w_down^T + b_down`` ``[M, r]``, both in h's dtype.
    """
    assert h.dim() == 2 and w_down.dim() == 2 and w_up.dim() == 2
    h, w_down, w_up = h.contiguous(), w_down.contiguous(), w_up.contiguous()
    b_down = None if b_down is None else b_down.contiguous()
    b_up = None if b_up is None else b_up.contiguous()
    residual = h if residual is None else residual.contiguous()
    M, N = h.shape
    R = w_down.shape[0]
    pre = torch.empty((M, R), dtype=h.dtype, device=h.device)
    out = torch.empty((M, N), dtype=h.dtype, device=h.device)
    if M == 0:
        return out, pre
    # act(pre), written by the down kernel's epilogue and read by the up kernel's A tiles: one
    # [M, r] write and read, instead of each of the N / BLOCK_N column tiles of the up kernel
    # evaluating the activation on its [BLOCK_M, r] rows again.
    act = torch.empty((M, R), dtype=h.dtype, device=h.device)
    precision = dot_precision(h.dtype)
    launch(
        adapter_down_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
        h, w_down, b_down, pre, act, M, N, R,
        interpreter_config=_INTERPRETER_CONFIG["down"],
        HAS_BIAS=b_down is not None, ACTIVATION=activation, BLOCK_R=block_r(R), DOT_PRECISION=precision,
    )
    if N > 0:
        launch(
            adapter_up_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
            act, w_up, b_up, residual, out, M, N, R, scaling,
            interpreter_config=_INTERPRETER_CONFIG["up"],
            HAS_BIAS=b_up is not None, BLOCK_R=UP_BLOCK_R, DOT_PRECISION=precision,
        )
    return out, pre


def adapter_bwd(grad_out, h, w_down, w_up, pre, activation: int, scaling: float, residual_is_h: bool):
    """Backward of adapter.

    grad_out and h ``[M, d]``, w_down ``[r, d]``, w_up ``[d, r]``, pre ``[M, r]`` from the
    forward; activation and scaling as in the forward; residual_is_h: the forward's residual was
    h itself (so dOut also flows into dh). Returns ``(dh [M, d], dw_down [r, d], db_down [r],
    dw_up [d, r], db_up [d])`` in the input dtype; both bias gradients are always computed.
    """
    assert grad_out.dim() == 2 and h.dim() == 2 and pre.dim() == 2
    grad_out, h, pre = grad_out.contiguous(), h.contiguous(), pre.contiguous()
    w_down, w_up = w_down.contiguous(), w_up.contiguous()
    M, N = h.shape
    R = w_down.shape[0]
    dtype, device = h.dtype, h.device
    precision = dot_precision(dtype)
    # Sums over M split across CTAs: accumulated in fp32 with atomics, cast at the end.
    dw_down = torch.zeros((R, N), dtype=torch.float32, device=device)
    db_down = torch.zeros((R,), dtype=torch.float32, device=device)
    dw_up = torch.zeros((N, R), dtype=torch.float32, device=device)
    db_up = torch.zeros((N,), dtype=torch.float32, device=device)
    dh = torch.empty((M, N), dtype=dtype, device=device)
    if M > 0:
        # dpre and act(pre) are kept in the input dtype, as eager PyTorch rounds them: they feed
        # the 16-bit tensor-core dots of the dh and dwd kernels. act is recomputed from pre by
        # the dz kernel (which evaluates act' there anyway) and written once for the dh kernel.
        dpre = torch.empty((M, R), dtype=dtype, device=device)
        act = torch.empty((M, R), dtype=dtype, device=device)
        launch(
            adapter_dz_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
            grad_out, w_up, pre, dpre, act, db_down, M, N, R, scaling,
            interpreter_config=_INTERPRETER_CONFIG["dz"],
            ACTIVATION=activation, BLOCK_R=block_r(R), DOT_PRECISION=precision,
        )
        if N > 0:
            split_m = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"] * meta["M_TILES"]))
            launch(
                adapter_dh_kernel, split_m,
                grad_out, w_down, dpre, act, dh, dw_up, db_up, M, N, R, scaling,
                interpreter_config=_INTERPRETER_CONFIG["dh"],
                RESIDUAL_IS_H=residual_is_h, BLOCK_R=block_r(R), DOT_PRECISION=precision,
            )
            launch(
                adapter_dwd_kernel, split_m,
                dpre, h, dw_down, M, N, R,
                interpreter_config=_INTERPRETER_CONFIG["dwd"],
                BLOCK_R=block_r(R), DOT_PRECISION=precision,
            )
    return dh, dw_down.to(dtype), db_down.to(dtype), dw_up.to(dtype), db_up.to(dtype)
