"""Triton kernels and launchers of ``qlora_linear``: LoRA over a 4-bit NF4 base weight.

Shapes (2-D views): x ``[M, K]``, the NF4 weight Ŵ ``[N, K]`` (packed uint8 ``[ceil(N*K/2)]``,
fp32 absmax ``[ceil(N*K/blocksize)]``, fp32 code ``[16]``), bias ``[N]``, lora_A ``[R, K]``,
lora_B ``[N, R]``, s = scaling, drop(x) = x * keep / (1 - dropout_p).

The math is lora_linear's on the dequantised weight, and so are four of its five kernels
(shrink, dY, dA and the dropout mask, imported from ``triton_kernels.lora_linear``). The two
GEMMs that read the weight are new here and dequantise it tile by tile inside their loop; no
dense weight is written to memory, and the weight gets no gradient:
  fwd GEMM ``out = x Ŵ^T + bias + s * xa B^T``                        ``[M, N]``
  dx GEMM  ``dx = dY Ŵ + (dxa A) * keep / (1 - dropout_p)``           ``[M, K]``

NF4 element ``i = n * K + k`` (int64) has its code in byte ``packed[i // 2]``, the high nibble
when i is even; it reads back as the fp32 ``code[nibble] * absmax[i // blocksize]``, rounded to
x's dtype before the dot, so the kernels agree with lora_linear on ``nf4.dequantize_nf4``'s
weight. blocksize is a power of two (32 ... 4096): the kernels take its log2 and shift.

Two ways to fetch a tile of Ŵ, chosen by the constexpr ``EVEN_K``:
  * K even (every real layer): a row of Ŵ starts on a byte, so a tile row is a contiguous run
    of bytes, loaded once (vectorised, pipelined by cp.async) and split into its two nibbles,
    which ``tl.interleave`` puts back in element order. blocksize is even, so both nibbles of a
    byte share one absmax: one scale load per byte.
  * K odd: rows start mid-byte and N*K may be odd, so each element gathers its own byte, nibble
    and scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltakern.triton_kernels.common import AotSpec, block_r, dot_precision, grouped_tile, launch
from deltakern.triton_kernels.lora_linear import (
    INTERPRETER_CONFIG,
    RANKS,
    SWEEP_RANKS,
    lora_low_rank_backward,
    lora_shrink,
    low_rank_tile,
)
from deltakern.triton_kernels.rng import dropout_keep, philox_seed

# --------------------------------------------------------------------------------------------
# Autotune configurations (sm_80 / sm_90)
# --------------------------------------------------------------------------------------------

# Every config below compiles without register spills on sm_80 and sm_90 for ranks 16 and 64
# (BLOCK_R 16 and 64), fp16 and bf16, checked by tests/triton_kernels/test_compile.py. NOTE the
# numbers quoted are ptxas -v registers per thread (fp16; bf16 is the same), "sm_80/sm_90", at
# rank 16 and 64.
#
# K even (the byte-pair path): lora_linear's tiles fit as they are. The dequantised tile is built
# in registers and goes through shared memory to the dot like any operand, and the packed bytes
# (contiguous, 8- and 16-byte cp.async) and their per-byte absmax are what the pipeline prefetches,
# a quarter and a half of the bytes of a 16-bit weight tile. 128x128 runs 8 warps, as in
# lora_linear (its low-rank prologue needs the room). Registers: fwd 128x128x32 200/141-144,
# 128x128x64 218/178, 128x64x32 188-200/146-167, 64x128x32 204-208/168-184, 64x64x64 168/130-148;
# dx 128x128x32 184-188/150-152, 128x128x64 222-224/176-188, 128x64x32 168/148-164, 64x128x32
# 202/178-182, 64x64x64 164-166/140. Shared memory at most 100 KiB (128x128x64, 3 stages, sm_90).
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=4),
]
DX_CONFIGS = FWD_CONFIGS

# dx with dropout: lora_linear's DX_DROPOUT_CONFIGS (32 output elements per thread, for the
# Philox state), which leave room for the dequantisation: 128x64x32 128-148/113-158,
# 64x128x32 128-130/141-169, 128x64x64 166-174/121-160, 64x64x64 168-196/142-153.
DX_DROPOUT_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=4),
]

# K odd (the per-element path, for all three GEMMs): every weight element carries an int64 index
# and three gathers (byte, scale, code), and the pipeline prefetches a 4-byte scale per element
# instead of per byte pair, so the configs above spill: the forward at 255 registers by 4 B
# (128x128x32 w8s4, rank 64, sm_80) to 756 B (64x128x32 w4s4), dx by 16-132 B (64x64x64 w4s3,
# 128x128x32 w8s4 at rank 64 on sm_90), dx with dropout by 8-116 B (64x64x64), and 128x128x32
# with 8 warps and dropout by 1.7-3.7 KB even at 2 stages. What fits is at most 16 weight elements
# per thread and 3 stages. Odd K is rare (no common model has an odd in_features), so two
# configs, one autotuner per kernel: 128x64x32 w8s3 (fwd 176-181/159-161, dx 128/108-127, dx with
# dropout 128-158/251-255: at the limit on sm_90 without spilling) and 64x64x32 w4s3 (fwd
# 238-239/234, dx 128-168/149-168, dx with dropout 168-174/240-255).
ODD_K_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
]


# --------------------------------------------------------------------------------------------
# Dequantisation
# --------------------------------------------------------------------------------------------


@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, code_ptr, rows, row_ok, col0, K, bs_log2,
              BLOCK_C: tl.constexpr, EVEN_K: tl.constexpr):
    """fp32 ``[len(rows), BLOCK_C]`` tile ``Ŵ[rows, col0 : col0 + BLOCK_C]`` of the NF4 weight.

    rows: int64 row indices of the ``[N, K]`` weight, row_ok their mask; columns past K are
    masked too. Masked elements read as 0. (The columns are masked, not wrapped onto valid ones
    as the GEMMs wrap their edge rows: a ``%`` per element and iteration costs more than a
    compare.)
    """
    if EVEN_K:
        # Byte j of the tile holds columns col0 + 2j (high nibble) and col0 + 2j + 1 (col0 is a
        # multiple of BLOCK_C, hence even): byte (row * K + col0) / 2 + j, a contiguous run per
        # row. blocksize is even, so both nibbles share one absmax.
        half_k = K // 2
        byte_cols = col0 // 2 + tl.arange(0, BLOCK_C // 2)
        byte = rows[:, None] * half_k + byte_cols[None, :]
        ok = row_ok[:, None] & (byte_cols < half_k)[None, :]
        q = tl.load(packed_ptr + byte, mask=ok, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + (byte >> (bs_log2 - 1)), mask=ok, other=0.0)
        hi = tl.load(code_ptr + (q >> 4)) * scale
        lo = tl.load(code_ptr + (q & 15)) * scale
        return tl.interleave(hi, lo)
    else:
        cols = col0 + tl.arange(0, BLOCK_C)
        element = rows[:, None] * K + cols[None, :]
        ok = row_ok[:, None] & (cols < K)[None, :]
        q = tl.load(packed_ptr + (element >> 1), mask=ok, other=0).to(tl.int32)
        # Even elements sit in the high nibble.
        nibble = (q >> ((1 - (element & 1).to(tl.int32)) * 4)) & 15
        scale = tl.load(absmax_ptr + (element >> bs_log2), mask=ok, other=0.0)
        return tl.load(code_ptr + nibble) * scale


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _qlora_fwd_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, xa_ptr, b_ptr, out_ptr, M, N, K, R, bs_log2, scaling,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[M, N] = x[M, K] @ Ŵ[N, K]^T + bias[N] + scaling * xa[M, R] @ B[N, R]^T, Ŵ read as NF4."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Edge rows / columns wrap onto valid ones for the loads (never stored).
    rows = offs_m % M
    cols = offs_n % N
    all_cols = offs_n >= 0  # the wrapped weight rows are all valid: only K is masked in the tile
    # Low-rank prologue, as in lora_linear's GEMM (registers; see _lora_fwd_kernel).
    acc = low_rank_tile(xa_ptr, b_ptr, rows, cols, R, 1, R, BLOCK_M, BLOCK_N, BLOCK_R, DOT_PRECISION) * scaling
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
        w = _nf4_tile(packed_ptr, absmax_ptr, code_ptr, cols, all_cols, k0, K, bs_log2, BLOCK_K, EVEN_K)
        acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _qlora_dx_kernel(
    dy_ptr, packed_ptr, absmax_ptr, code_ptr, dxa_ptr, a_ptr, dx_ptr, M, N, K, R, bs_log2, seed, dropout_p,
    keep_scale,
    HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dx[M, K] = dY[M, N] @ Ŵ[N, K] + (dxa[M, R] @ A[R, K]) * keep * keep_scale, Ŵ read as NF4.

    GEMM naming as in _lora_dx_kernel: the output tile is BLOCK_M x BLOCK_N over (M, K);
    BLOCK_K steps through N.
    """
    pid_m, pid_n = grouped_tile(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % K
    acc = low_rank_tile(dxa_ptr, a_ptr, rows, cols, R, K, 1, BLOCK_M, BLOCK_N, BLOCK_R, DOT_PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, offs_m[:, None] * K + offs_n[None, :], dropout_p)
        acc = tl.where(keep, acc * keep_scale, 0.0)
    for n0 in range(0, N, BLOCK_K):
        # int64: the weight rows index N * K elements, which may pass 2**31.
        offs_red = n0 + tl.arange(0, BLOCK_K).to(tl.int64)
        red_ok = offs_red < N
        dy = tl.load(dy_ptr + rows[:, None] * N + offs_red[None, :], mask=red_ok[None, :], other=0.0)
        w = _nf4_tile(packed_ptr, absmax_ptr, code_ptr, offs_red, red_ok, pid_n * BLOCK_N, K, bs_log2, BLOCK_N,
                      EVEN_K)
        acc = tl.dot(dy, w.to(dy_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    tl.store(dx_ptr + offs_m[:, None] * K + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < K)[None, :])


qlora_fwd_kernel = triton.autotune(FWD_CONFIGS, key=["M", "N", "K"])(_qlora_fwd_kernel)
qlora_dx_kernel = triton.autotune(DX_CONFIGS, key=["M", "N", "K"])(_qlora_dx_kernel)
qlora_dx_dropout_kernel = triton.autotune(DX_DROPOUT_CONFIGS, key=["M", "N", "K"])(_qlora_dx_kernel)
# One autotuner per kernel and K parity: the parity changes which tiles fit in registers.
qlora_fwd_odd_k_kernel = triton.autotune(ODD_K_CONFIGS, key=["M", "N", "K"])(_qlora_fwd_kernel)
qlora_dx_odd_k_kernel = triton.autotune(ODD_K_CONFIGS, key=["M", "N", "K"])(_qlora_dx_kernel)
qlora_dx_dropout_odd_k_kernel = triton.autotune(ODD_K_CONFIGS, key=["M", "N", "K"])(_qlora_dx_kernel)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compiles (triton_kernels.aot)
# --------------------------------------------------------------------------------------------


_ODD_K = "(K odd)"


def _aot_signatures(dtype: str, flags: dict) -> dict:
    """Runtime argument types of each kernel for ``dtype`` inputs."""
    t = f"*{dtype}"
    nf4 = {"packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32"}
    dx = {"dy_ptr": t, **nf4, "dxa_ptr": t, "a_ptr": t, "dx_ptr": t, "M": "i32", "N": "i32", "K": "i32",
          "R": "i32", "bs_log2": "i32", "seed": "i64", "dropout_p": "fp32", "keep_scale": "fp32"}
    fwd = {"x_ptr": t, **nf4, "bias_ptr": t, "xa_ptr": t, "b_ptr": t, "out_ptr": t,
           "M": "i32", "N": "i32", "K": "i32", "R": "i32", "bs_log2": "i32", "scaling": "fp32"}
    # The odd-K kernels carry a marker entry (no argument has its name, so compile_kernel skips
    # it) that keeps K out of ``divisible``: they only run when K is odd.
    odd = {_ODD_K: ""}
    return {"fwd": fwd, "fwd_odd_k": {**fwd, **odd}, "dx": dx, "dx_odd_k": {**dx, **odd},
            "dx_dropout": dx, "dx_dropout_odd_k": {**dx, **odd}}


AOT = AotSpec(
    kernels={
        "fwd": (qlora_fwd_kernel, {"HAS_BIAS": (True, False), "EVEN_K": (True,)}),
        "fwd_odd_k": (qlora_fwd_odd_k_kernel, {"HAS_BIAS": (True, False), "EVEN_K": (False,)}),
        "dx": (qlora_dx_kernel, {"HAS_DROPOUT": (False,), "EVEN_K": (True,)}),
        "dx_odd_k": (qlora_dx_odd_k_kernel, {"HAS_DROPOUT": (False,), "EVEN_K": (False,)}),
        "dx_dropout": (qlora_dx_dropout_kernel, {"HAS_DROPOUT": (True,), "EVEN_K": (True,)}),
        "dx_dropout_odd_k": (qlora_dx_dropout_odd_k_kernel, {"HAS_DROPOUT": (True,), "EVEN_K": (False,)}),
    },
    signatures=_aot_signatures,
    variants=RANKS,
    sweep_variants=SWEEP_RANKS,
    variant_tag="r",
    variant_constexprs=lambda kernel, rank: {"BLOCK_R": block_r(rank)},
    # The JIT's run-time specialisation for real layers: 16-byte aligned pointers (the caching
    # allocator's) and row lengths that are multiples of 16; K only where it may be even.
    divisible=lambda signature: tuple(
        name for name in signature if name.endswith("_ptr") or name == "N" or (name == "K" and _ODD_K not in signature)),
)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _blocksize_log2(blocksize: int) -> int:
    assert blocksize >= 2 and blocksize & (blocksize - 1) == 0, f"NF4 blocksize must be a power of two, got {blocksize}"
    return blocksize.bit_length() - 1


def _check_nf4(packed, absmax, code, numel: int, blocksize: int) -> None:
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2, (packed.dtype, packed.shape, numel)
    assert absmax.dtype == torch.float32 and absmax.numel() == -(-numel // blocksize), (absmax.shape, numel)
    assert code.dtype == torch.float32 and code.numel() == 16


def qlora_linear_fwd(x, packed, absmax, code, blocksize: int, out_features: int, bias, lora_A, lora_B,
                     scaling: float, dropout_p: float, seed: int):
    """Forward of qlora_linear.

    x ``[M, K]``; the NF4 weight ``[out_features, K]`` as packed (uint8 ``[ceil(N*K/2)]``),
    absmax (fp32 ``[ceil(N*K/blocksize)]``) and code (fp32 ``[16]``); bias ``[N]`` or None,
    lora_A ``[R, K]``, lora_B ``[N, R]``. Returns ``out = x Ŵ^T + bias + scaling * xa B^T``
    ``[M, N]`` and ``xa = drop(x) A^T`` ``[M, R]``, both in x's dtype, as lora_linear_fwd on the
    weight dequantised to x's dtype; the dense weight is never formed.
    """
    assert x.dim() == 2 and lora_A.dim() == 2 and lora_B.dim() == 2
    x, lora_A, lora_B = x.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    packed, absmax, code = packed.contiguous().reshape(-1), absmax.contiguous().reshape(-1), code.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    M, K = x.shape
    N, R = int(out_features), lora_A.shape[0]
    _check_nf4(packed, absmax, code, N * K, blocksize)
    xa = lora_shrink(x, lora_A, dropout_p, seed)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    precision = dot_precision(x.dtype)
    even_k = K % 2 == 0
    launch(
        qlora_fwd_kernel if even_k else qlora_fwd_odd_k_kernel,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
        x, packed, absmax, code, bias, xa, lora_B, out, M, N, K, R, _blocksize_log2(blocksize), scaling,
        interpreter_config=INTERPRETER_CONFIG["gemm"],
        HAS_BIAS=bias is not None, EVEN_K=even_k, BLOCK_R=block_r(R), DOT_PRECISION=precision,
    )
    return out, xa


def qlora_linear_bwd(grad_out, x, packed, absmax, code, blocksize: int, lora_A, lora_B, xa, scaling: float,
                     dropout_p: float, seed: int):
    """Backward of qlora_linear for x, lora_A and lora_B (the NF4 weight gets no gradient).

    grad_out ``[M, N]``, x ``[M, K]``, the NF4 weight as in :func:`qlora_linear_fwd`, lora_A
    ``[R, K]``, lora_B ``[N, R]``, xa ``[M, R]`` from the forward; scaling, dropout_p and seed as
    in the forward (the mask is regenerated). Returns dx ``[M, K]``, dA ``[R, K]``, dB ``[N, R]``
    in x's dtype; dA and dB are accumulated in fp32.
    """
    assert grad_out.dim() == 2 and x.dim() == 2 and xa.dim() == 2
    grad_out, x = grad_out.contiguous(), x.contiguous()
    lora_A, lora_B, xa = lora_A.contiguous(), lora_B.contiguous(), xa.contiguous()
    packed, absmax, code = packed.contiguous().reshape(-1), absmax.contiguous().reshape(-1), code.contiguous()
    M, K = x.shape
    N, R = grad_out.shape[1], lora_A.shape[0]
    _check_nf4(packed, absmax, code, N * K, blocksize)
    has_dropout = dropout_p > 0.0
    dxa, da, db = lora_low_rank_backward(grad_out, x, lora_B, xa, scaling, dropout_p, seed)
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
    even_k = K % 2 == 0
    if has_dropout:
        dx_kernel = qlora_dx_dropout_kernel if even_k else qlora_dx_dropout_odd_k_kernel
    else:
        dx_kernel = qlora_dx_kernel if even_k else qlora_dx_odd_k_kernel
    launch(
        dx_kernel,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),),
        grad_out, packed, absmax, code, dxa, lora_A, dx, M, N, K, R, _blocksize_log2(blocksize), philox_seed(seed),
        dropout_p, 1.0 / (1.0 - dropout_p),
        interpreter_config=INTERPRETER_CONFIG["gemm"],
        HAS_DROPOUT=has_dropout, EVEN_K=even_k, BLOCK_R=block_r(R), DOT_PRECISION=dot_precision(x.dtype),
    )
    return dx, da.to(x.dtype), db.to(x.dtype)
