"""Triton kernels and launchers of ``dora_linear`` (DoRA).

Shapes (2-D views): x ``[M, K]``, weight W ``[N, K]`` with any strides (transformers' Conv1D
hands over a transposed view, which is read in place: no ``[N, K]`` copy), bias ``[N]``,
lora_A ``[R, K]``, lora_B ``[N, R]``, the fp32 column scale c ``[N]`` (magnitude / ‖W + s B A‖,
computed by ``ops/dora_linear.py``), s = scaling, x̃ = drop(x) = x * keep / (1 - dropout_p).

Forward:
  p == 0: shrink ``xa = x A^T`` (lora_linear's kernel), then one GEMM whose epilogue scales the
          columns: ``z = x W^T + s xa B^T``, ``y = c * z + bias``.
  p > 0:  per row block (below): the dropout kernel writes x̃, the shrink gives ``xa = x̃ A^T``,
          then one GEMM with two accumulators over the same W tiles, both started at
          ``s xa B^T``: ``a = x W^T + s xa B^T`` and ``z = x̃ W^T + s xa B^T``, so that
          ``y = a + bias + (c - 1) * z`` ( = ``x W^T + b + (c-1) x̃ W^T + c s xa B^T``).
  z is stored only when the magnitude needs a gradient (``save_z``).
Backward:
  dY  ``dxa = s (c*g) B``, ``dB += s (c*g)^T xa`` and ``d_scale += sum_rows g * z`` from one
      read of g = dY and z
  dA  ``dA = dxa^T x̃`` (lora_linear's kernel, mask regenerated)
  dx  p == 0: ``dx = (c*g) W + dxa A``;
      p > 0:  ``dx = g W + keep / (1 - p) * (((c-1)*g) W + dxa A)``, two accumulators over the
      same W tiles, the mask regenerated once per output element in the epilogue.
The column scale of g is applied to each g tile as it is loaded (no ``[M, N]`` copy of c*g).

Why x̃ is written to memory in the forward (in row blocks of at most ``_DROP_CHUNK_VALUES``
elements: the contract allows no whole ``[M, K]`` copy) instead of masking each x tile inside the
GEMM loop: that loop reads every x tile once per output column tile, so the Philox mask would be
drawn N / BLOCK_N times per element instead of once. NOTE measured on the PTX of the 128x128x32 /
8-warp forward (bf16, rank 16) against a scratch variant masking in the loop: the mask added 521
(sm_80) and 544 (sm_90) instructions per thread to each K step (77 mul.hi: one Philox call per
four elements already), beside the two dots' 64 mma.sync per warp. That is ~4,200 warp
instructions per CTA and step, ~1,000 clocks of an SM's four issue slots: as long as its tensor
cores take for the step's 2.1 MFLOP on an A100 (1,024 clocks) and twice as long as on an H100
(512), where the mask would bound the GEMM at about half speed (estimated from these counts; no
GPU was at hand to time it). x̃ instead costs M*K elements written once and read twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltakern.triton_kernels import lora_linear
from deltakern.triton_kernels.common import (
    AotSpec,
    block_r,
    dot_precision,
    grouped_tile,
    launch,
)
from deltakern.triton_kernels.lora_linear import (
    INTERPRETER_CONFIG,
    RANKS,
    SWEEP_RANKS,
    lora_da,
    lora_shrink,
    low_rank_tile,
)
from deltakern.triton_kernels.rng import dropout_keep, philox_seed

# --------------------------------------------------------------------------------------------
# Autotune configurations (sm_80 / sm_90)
# --------------------------------------------------------------------------------------------

# Every config below compiles without register spills on sm_80 and sm_90 for ranks 16 and 64,
# fp16 and bf16 (tests/triton_kernels/test_compile.py). NOTE the numbers are ptxas -v registers
# per thread, "sm_80/sm_90", over ranks 16 and 64 and both dtypes.
#
# Without dropout the forward and dx GEMMs are lora_linear's with a column scale in the epilogue
# or on the dY tile, and lora_linear's GEMM tiles fit: fwd 128x128x32 179-185/170-172, 128x128x64
# 196-202/170-171, 128x64x32 154-186/146-168, 64x128x32 165-191/150-178, 64x64x64 126-128/88-127;
# dx 158-180/119-128, 161-176/153-154, 154-168/128-166, 157-167/126-128, 125-128/116-117.
FWD_CONFIGS = DX_CONFIGS = lora_linear.GEMM_CONFIGS

# The forward with dropout carries two [BLOCK_M, BLOCK_N] accumulators over the same W tiles, and
# the same tiles still fit: 128x128x32 248-250/238, 128x128x64 255/235 (the limit on sm_80, no
# spill; 96/152 KiB of shared memory for x, x̃ and W over 3 stages), 128x64x32 228-230/204,
# 64x128x32 232/198, 64x64x64 168/122-128.
FWD_DROPOUT_CONFIGS = lora_linear.GEMM_CONFIGS

# dx with dropout: two accumulators and the Philox mask of the whole output tile in the epilogue;
# lora_linear's tiles of 32 output elements per thread fit: 128x64x32 w8 168-171/135, 64x128x32 w8
# 168-169/133, 128x64x64 w8 250-254/169, 64x64x64 w4 236-246/168.
DX_DROPOUT_CONFIGS = lora_linear.DX_DROPOUT_CONFIGS

# dY: lora_linear's dY tiles plus the z tile and the d_scale partial. 64x128 on 8 warps, which
# fits lora_linear, spills here at rank 64 (144 B on sm_80, 64 B on sm_90, at 2 or 3 stages), so
# two of its three configs remain: 64x64 w4 212-220/212-216 at rank 16 and 255/236-238 at rank
# 64; 128x64 w8 190-192/192 and 255/245.
DY_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=3, num_warps=8),
]

# The dropout kernel is element-wise (31/48 registers): one config, no tuning.
DROPOUT_CONFIGS = [triton.Config({"BLOCK_SIZE": 1024}, num_warps=4)]

_INTERPRETER_DROPOUT = {"BLOCK_SIZE": 256}

# x̃ is written in row blocks of at most this many elements (32 MiB in 16 bits), each a multiple
# of _CHUNK_ROWS rows (the tallest BLOCK_M, so only a block's last row tile is partial).
_DROP_CHUNK_VALUES = 1 << 24
_CHUNK_ROWS = 128


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _dora_dropout_kernel(x_ptr, out_ptr, numel, first_element, seed, dropout_p, keep_scale, BLOCK_SIZE: tl.constexpr):
    """out[e] = x[e] * keep(first_element + e) * keep_scale for the numel elements of a row block
    of the contiguous ``[M, K]`` x, whose first element has linear index first_element."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    ok = offs < numel
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    keep = dropout_keep(seed, first_element + offs, dropout_p)
    tl.store(out_ptr + offs, tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _dora_fwd_kernel(
    x_ptr, xd_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, scale_ptr, y_ptr, z_ptr, M, N, K, R, stride_wn, stride_wk,
    scaling,
    HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Z: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y[M, N] and z[M, N] (when SAVE_Z) of the module docstring; x̃ = xd[M, K] when HAS_DROPOUT."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Edge rows / columns wrap onto valid ones for the loads (never stored): only K is masked.
    rows = offs_m % M
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * K + offs_k[None, :]
    # W^T tile [BLOCK_K, BLOCK_N]; 64-bit pointers, so K * stride_wk past 2**31 is fine.
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
    # The low-rank term starts the accumulators (lora_linear's prologue, for registers).
    acc = low_rank_tile(xa_ptr, b_ptr, rows, cols, R, 1, R, BLOCK_M, BLOCK_N, BLOCK_R, DOT_PRECISION) * scaling
    if HAS_DROPOUT:
        acc_z = acc
        xd_ptrs = xd_ptr + rows[:, None] * K + offs_k[None, :]
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        w_t = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        acc = tl.dot(x, w_t, acc, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            xd = tl.load(xd_ptrs, mask=k_ok[None, :], other=0.0)
            acc_z = tl.dot(xd, w_t, acc_z, input_precision=DOT_PRECISION)
            xd_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    c = tl.load(scale_ptr + cols)[None, :]
    if HAS_DROPOUT:
        z = acc_z
        y = acc + (c - 1.0) * acc_z
    else:
        z = acc
        y = acc * c
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_offs = offs_m[:, None] * N + offs_n[None, :]
    out_ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=out_ok)
    if SAVE_Z:
        tl.store(z_ptr + out_offs, z.to(z_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _dora_dy_kernel(
    dy_ptr, z_ptr, scale_ptr, b_ptr, xa_ptr, dxa_ptr, db_ptr, dscale_ptr, M, N, R, scaling,
    HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """With gc = c * dY: dxa[M, R] = s * gc @ B[N, R]; db[N, R] (fp32, pre-zeroed) += s * gc^T @
    xa[M, R]; when HAS_Z, dscale[N] (fp32, pre-zeroed) += sum over rows of dY * z[M, N].

    One program per BLOCK_M rows reads its rows of dY (and z) once and feeds all three.
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
        tile = offs_m[:, None] * N + offs_n[None, :]
        tile_ok = m_ok[:, None] & n_ok[None, :]
        g = tl.load(dy_ptr + tile, mask=tile_ok, other=0.0)
        c = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
        # Rounded to dY's dtype, as eager autograd rounds c * dY, to feed the tensor cores.
        gc = (g.to(tl.float32) * c[None, :]).to(g.dtype)
        b = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(gc, b, acc, input_precision=DOT_PRECISION)
        db = tl.dot(tl.trans(gc), xa, input_precision=DOT_PRECISION) * scaling
        # Relaxed ordering: the partial sums only need atomicity, not fences around them.
        tl.atomic_add(db_ptr + offs_n[:, None] * R + offs_r[None, :], db, mask=n_ok[:, None] & r_ok[None, :],
                      sem="relaxed")
        if HAS_Z:
            z = tl.load(z_ptr + tile, mask=tile_ok, other=0.0)
            tl.atomic_add(dscale_ptr + offs_n, tl.sum(g.to(tl.float32) * z.to(tl.float32), axis=0), mask=n_ok,
                          sem="relaxed")
    tl.store(dxa_ptr + offs_m[:, None] * R + offs_r[None, :], (acc * scaling).to(dxa_ptr.dtype.element_ty),
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _dora_dx_kernel(
    dy_ptr, w_ptr, scale_ptr, dxa_ptr, a_ptr, dx_ptr, M, N, K, R, stride_wn, stride_wk, seed, dropout_p,
    keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dx[M, K] of the module docstring from dY[M, N], W[N, K], c[N], dxa[M, R] and A[R, K].

    GEMM naming as in lora_linear's dx kernel: the output tile is BLOCK_M x BLOCK_N over (M, K);
    BLOCK_K steps through N.
    """
    pid_m, pid_n = grouped_tile(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % K
    offs_red = tl.arange(0, BLOCK_K)
    dy_ptrs = dy_ptr + rows[:, None] * N + offs_red[None, :]
    w_ptrs = w_ptr + offs_red[:, None] * stride_wn + cols[None, :] * stride_wk
    # dxa A first, as lora_linear's dx kernel does (registers); with dropout it is masked below,
    # together with the ((c - 1) * g) W term it starts.
    acc = low_rank_tile(dxa_ptr, a_ptr, rows, cols, R, K, 1, BLOCK_M, BLOCK_N, BLOCK_R, DOT_PRECISION)
    if HAS_DROPOUT:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        red_ok = offs_red < N - n0
        g = tl.load(dy_ptrs, mask=red_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=red_ok[:, None], other=0.0)
        c = tl.load(scale_ptr + n0 + offs_red, mask=red_ok, other=0.0)[None, :]
        if HAS_DROPOUT:
            acc_g = tl.dot(g, w, acc_g, input_precision=DOT_PRECISION)
            g_drop = (g.to(tl.float32) * (c - 1.0)).to(g.dtype)
            acc = tl.dot(g_drop, w, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot((g.to(tl.float32) * c).to(g.dtype), w, acc, input_precision=DOT_PRECISION)
        dy_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wn
    if HAS_DROPOUT:
        keep = dropout_keep(seed, offs_m[:, None] * K + offs_n[None, :], dropout_p)
        acc = acc_g + tl.where(keep, acc * keep_scale, 0.0)
    tl.store(dx_ptr + offs_m[:, None] * K + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < K)[None, :])


dora_dropout_kernel = triton.autotune(DROPOUT_CONFIGS, key=[])(_dora_dropout_kernel)
dora_fwd_kernel = triton.autotune(FWD_CONFIGS, key=["M", "N", "K"])(_dora_fwd_kernel)
dora_fwd_dropout_kernel = triton.autotune(FWD_DROPOUT_CONFIGS, key=["M", "N", "K"])(_dora_fwd_kernel)
# The atomically accumulated buffers are zeroed before every timing run of the autotuner.
dora_dy_kernel = triton.autotune(DY_CONFIGS, key=["M", "N", "R"], reset_to_zero=["db_ptr", "dscale_ptr"])(
    _dora_dy_kernel)
dora_dx_kernel = triton.autotune(DX_CONFIGS, key=["M", "N", "K"])(_dora_dx_kernel)
dora_dx_dropout_kernel = triton.autotune(DX_DROPOUT_CONFIGS, key=["M", "N", "K"])(_dora_dx_kernel)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compiles (triton_kernels.aot)
# --------------------------------------------------------------------------------------------


def _aot_signatures(dtype: str, flags: dict) -> dict:
    """Runtime argument types of each kernel for ``dtype`` inputs (a contiguous weight: its
    unit stride is the ``stride_wk = 1`` the JIT specialises, set with the flags)."""
    t = f"*{dtype}"
    fwd = {"x_ptr": t, "xd_ptr": t, "w_ptr": t, "bias_ptr": t, "xa_ptr": t, "b_ptr": t, "scale_ptr": "*fp32",
           "y_ptr": t, "z_ptr": t, "M": "i32", "N": "i32", "K": "i32", "R": "i32", "stride_wn": "i32",
           "scaling": "fp32"}
    dx = {"dy_ptr": t, "w_ptr": t, "scale_ptr": "*fp32", "dxa_ptr": t, "a_ptr": t, "dx_ptr": t, "M": "i32",
          "N": "i32", "K": "i32", "R": "i32", "stride_wn": "i32", "seed": "i64", "dropout_p": "fp32",
          "keep_scale": "fp32"}
    return {
        "dropout": {"x_ptr": t, "out_ptr": t, "numel": "i32", "first_element": "i64", "seed": "i64",
                    "dropout_p": "fp32", "keep_scale": "fp32"},
        "fwd": fwd,
        "fwd_dropout": fwd,
        "dy": {"dy_ptr": t, "z_ptr": t, "scale_ptr": "*fp32", "b_ptr": t, "xa_ptr": t, "dxa_ptr": t,
               "db_ptr": "*fp32", "dscale_ptr": "*fp32", "M": "i32", "N": "i32", "R": "i32", "scaling": "fp32"},
        "dx": dx,
        "dx_dropout": dx,
    }


AOT = AotSpec(
    # Every flag each way, the heaviest first (bias present, z saved); dropout has its own
    # autotuner. The fp32 scale and the unit stride are the same whatever the inputs.
    kernels={
        "dropout": (dora_dropout_kernel, {}),
        "fwd": (dora_fwd_kernel, {"HAS_DROPOUT": (False,), "HAS_BIAS": (True, False), "SAVE_Z": (True, False),
                                  "stride_wk": (1,)}),
        "fwd_dropout": (dora_fwd_dropout_kernel, {"HAS_DROPOUT": (True,), "HAS_BIAS": (True, False),
                                                  "SAVE_Z": (True, False), "stride_wk": (1,)}),
        "dy": (dora_dy_kernel, {"HAS_Z": (True, False)}),
        "dx": (dora_dx_kernel, {"HAS_DROPOUT": (False,), "stride_wk": (1,)}),
        "dx_dropout": (dora_dx_dropout_kernel, {"HAS_DROPOUT": (True,), "stride_wk": (1,)}),
    },
    signatures=_aot_signatures,
    variants=RANKS,
    sweep_variants=SWEEP_RANKS,
    variant_tag="r",
    variant_constexprs=lambda kernel, rank: {} if kernel == "dropout" else {"BLOCK_R": block_r(rank)},
    # The JIT's run-time specialisation for real layers: 16-byte aligned pointers (the caching
    # allocator's) and row lengths, hence the weight's row stride, that are multiples of 16.
    divisible=lambda signature: tuple(
        name for name in signature if name.endswith("_ptr") or name in ("N", "K", "stride_wn")),
)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _drop_chunk_rows(k: int) -> int:
    """Rows of x̃ written at a time: at most ``_DROP_CHUNK_VALUES`` values, a multiple of
    ``_CHUNK_ROWS`` rows (at least one such block)."""
    return max(_CHUNK_ROWS, _DROP_CHUNK_VALUES // max(k, 1) // _CHUNK_ROWS * _CHUNK_ROWS)


def _fwd_gemm(x, x_drop, weight, bias, xa, lora_B, scale, y, z, scaling: float, save_z: bool):
    """Launches the forward GEMM on one row block (x_drop is None without dropout)."""
    M, K = x.shape
    N, R = weight.shape[0], xa.shape[1]
    has_dropout = x_drop is not None
    launch(
        dora_fwd_dropout_kernel if has_dropout else dora_fwd_kernel,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
        x, x_drop, weight, bias, xa, lora_B, scale, y, z if save_z else None, M, N, K, R,
        weight.stride(0), weight.stride(1), scaling,
        interpreter_config=INTERPRETER_CONFIG["gemm"],
        HAS_DROPOUT=has_dropout, HAS_BIAS=bias is not None, SAVE_Z=save_z, BLOCK_R=block_r(R),
        DOT_PRECISION=dot_precision(x.dtype),
    )


def dora_linear_fwd(x, weight, bias, lora_A, lora_B, scale, scaling: float, dropout_p: float, seed: int,
                    save_z: bool):
    """Forward of dora_linear.

    x ``[M, K]``, weight ``[N, K]`` (any strides), bias ``[N]`` or None, lora_A ``[R, K]``,
    lora_B ``[N, R]``, scale ``[N]`` fp32 (c = magnitude / ‖W + s B A‖). Returns, in x's dtype,
    ``y`` ``[M, N]``, ``xa = drop(x) A^T`` ``[M, R]`` and ``z = drop(x) W^T + s xa B^T``
    ``[M, N]`` when save_z (else an empty ``[0]`` tensor), where ``y = c * z + bias`` without
    dropout and ``y = x W^T + bias + (c - 1) * drop(x) W^T + c * s xa B^T`` with it; drop keeps
    element (m, k) by Philox(seed) and scales by 1/(1-dropout_p).
    """
    assert x.dim() == 2 and weight.dim() == 2 and lora_A.dim() == 2 and lora_B.dim() == 2
    assert scale.dtype == torch.float32 and scale.shape == (weight.shape[0],), (scale.dtype, scale.shape)
    x, lora_A, lora_B, scale = x.contiguous(), lora_A.contiguous(), lora_B.contiguous(), scale.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    z = torch.empty((M, N) if save_z else (0,), dtype=x.dtype, device=x.device)
    if dropout_p == 0.0:
        xa = lora_shrink(x, lora_A, 0.0, seed)
        _fwd_gemm(x, None, weight, bias, xa, lora_B, scale, y, z, scaling, save_z)
        return y, xa, z
    xa = torch.empty((M, R), dtype=x.dtype, device=x.device)
    rows = _drop_chunk_rows(K)
    x_drop = torch.empty((min(M, rows), K), dtype=x.dtype, device=x.device)
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        chunk = x[r0:r1]
        chunk_drop = x_drop[: r1 - r0]
        numel = chunk.numel()
        launch(
            dora_dropout_kernel, lambda meta, numel=numel: (triton.cdiv(numel, meta["BLOCK_SIZE"]),),
            chunk, chunk_drop, numel, r0 * K, philox_seed(seed), dropout_p, 1.0 / (1.0 - dropout_p),
            interpreter_config=_INTERPRETER_DROPOUT,
        )
        # x̃ already carries 1/(1-p): the shrink runs without dropout on it.
        chunk_xa = lora_shrink(chunk_drop, lora_A, 0.0, seed)
        xa[r0:r1] = chunk_xa
        _fwd_gemm(chunk, chunk_drop, weight, bias, chunk_xa, lora_B, scale, y[r0:r1], z[r0:r1] if save_z else z,
                  scaling, save_z)
    return y, xa, z


def dora_linear_bwd(grad_out, x, weight, lora_A, lora_B, scale, xa, z, scaling: float, dropout_p: float,
                    seed: int):
    """Backward of dora_linear for x, lora_A, lora_B and the scale.

    grad_out ``[M, N]``, x ``[M, K]``, weight ``[N, K]`` (any strides), lora_A ``[R, K]``, lora_B
    ``[N, R]``, scale ``[N]`` fp32, xa ``[M, R]`` and z (``[M, N]``, or the empty ``[0]`` when the
    scale needs no gradient) from the forward; scaling, dropout_p and seed as in the forward (the
    mask is regenerated). Returns dx ``[M, K]``, dA ``[R, K]``, dB ``[N, R]`` in x's dtype and
    d_scale = ``sum_rows grad_out * z`` ``[N]`` fp32 (``[0]`` when z is), dA, dB and d_scale
    accumulated in fp32 with atomics.
    """
    assert grad_out.dim() == 2 and x.dim() == 2 and xa.dim() == 2
    assert scale.dtype == torch.float32 and scale.shape == (weight.shape[0],), (scale.dtype, scale.shape)
    grad_out, x, scale = grad_out.contiguous(), x.contiguous(), scale.contiguous()
    lora_A, lora_B, xa = lora_A.contiguous(), lora_B.contiguous(), xa.contiguous()
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    has_z = z.dim() == 2
    if has_z:
        z = z.contiguous()
    precision = dot_precision(x.dtype)
    philox = philox_seed(seed)
    keep_scale = 1.0 / (1.0 - dropout_p)
    # dxa is kept in x's dtype, as eager PyTorch rounds it: it feeds the 16-bit dots of dA and dx.
    dxa = torch.empty((M, R), dtype=x.dtype, device=x.device)
    # d_scale, like dB beside it in the dY loop, is summed over row blocks with fp32 atomics:
    # (M / BLOCK_M) * N adds, and no partial-sum buffer whose height would follow the autotuned
    # BLOCK_M. The adds come in any order, so d_scale, dA and dB repeat to fp32 rounding, not bit
    # for bit (as lora_linear's dA and dB).
    db = torch.zeros((N, R), dtype=torch.float32, device=x.device)
    d_scale = torch.zeros((N,) if has_z else (0,), dtype=torch.float32, device=x.device)
    launch(
        dora_dy_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
        grad_out, z if has_z else None, scale, lora_B, xa, dxa, db, d_scale if has_z else None, M, N, R, scaling,
        interpreter_config=INTERPRETER_CONFIG["dy"],
        HAS_Z=has_z, BLOCK_R=block_r(R), DOT_PRECISION=precision,
    )
    da = lora_da(dxa, x, dropout_p, seed)
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
    launch(
        dora_dx_dropout_kernel if dropout_p > 0.0 else dora_dx_kernel,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),),
        grad_out, weight, scale, dxa, lora_A, dx, M, N, K, R, weight.stride(0), weight.stride(1), philox, dropout_p,
        keep_scale,
        interpreter_config=INTERPRETER_CONFIG["gemm"],
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_R=block_r(R), DOT_PRECISION=precision,
    )
    return dx, da.to(x.dtype), db.to(x.dtype), d_scale
