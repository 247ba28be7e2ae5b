"""Triton kernels and launchers of ``ia3_linear``.

Shapes (2-D views, contiguous, one dtype): x ``[M, K]``, weight W ``[N, K]``, bias ``[N]``,
scale s ``[N]`` (output scale) or ``[K]`` (input scale), dY = grad_out ``[M, N]``.

Forward, one GEMM kernel (``SCALE_INPUT`` picks where s goes):
  output scale  ``z = x W^T + bias``, epilogue stores z and ``out = z * s``         ``[M, N]`` x 2
  input scale   ``out = (x * s) W^T + bias``, each x tile scaled per K column as it
                is loaded, before the dot                                          ``[M, N]``
Backward, one GEMM kernel ``dx = dY W`` over (M, K) tiles, reduction over N:
  output scale  ``dx = (dY * s) W``, each dY tile scaled per N column before the dot; the
                programs of the first K-column tile also load z beside dY and write
                ``Σ_rows dY * z`` of their rows                                     ``[M, K]``
  input scale   ``g = dY W``, epilogue ``dx = g * s`` and ``Σ_rows g * x`` of the tile
                                                                                    ``[M, K]``

The scale is never a pass of its own over x, z or dY: it rides on the GEMM's loads or its
epilogue. ds is a sum over M split across row tiles: each row tile writes its fp32 partial
sum to its own row of a ``[row tiles, N or K]`` buffer and torch sums the rows afterwards
(see the NOTE at ``_partial_rows``). All kernels take contiguous row-major tensors, so row
strides are the dimensions themselves and the unit stride is known at compile time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltakern.triton_kernels.common import AotSpec, dot_precision, grouped_tile, interpreted, launch

# --------------------------------------------------------------------------------------------
# Autotune configurations (sm_80 / sm_90), one small config for the interpreter
# --------------------------------------------------------------------------------------------

# Every config below is checked by tests/triton_kernels/test_compile.py to compile without
# register spills on sm_80 and sm_90, fp16 and bf16, with the scale on either side. They are the
# classic tensor-core GEMM tiles: 128x128 is the throughput tile, 128x64 / 64x128 keep more CTAs
# in flight when M or N (K for dx) is only a few tiles, BLOCK_K 32 with 4 stages and 64 with 3
# keep the cp.async / TMA pipeline full within shared memory, GROUP_M = 8 walks tiles in column
# groups so the W tiles are reused from L2.
# Figures after each config are the most registers ptxas -v reported over fp16 / bf16,
# "sm_80 / sm_90", as fwd (output scale, input scale); bwd (output scale, input scale). The
# heavy ones are the output-scale forward (z and out both stored from the accumulator) and the
# input-scale backward (the Σ g * x column sum beside the accumulator). 128x128 tiles run 8
# warps: on 4 warps these two spilled on sm_90 (40 B and 120 B, 255 registers), and 128x256 /
# 8 warps spilled in both (152 B and 296 B on sm_90).
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4,
                  num_warps=8),  # fwd 171 / 180, 130 / 128; bwd 160 / 158, 177 / 221
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3,
                  num_warps=8),  # fwd 182 / 182, 166 / 136; bwd 169 / 197, 184 / 221
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4,
                  num_warps=4),  # fwd 162 / 144, 128 / 120; bwd 196 / 168, 158 / 178
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4,
                  num_warps=4),  # fwd 154 / 148, 142 / 122; bwd 146 / 130, 166 / 170
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3,
                  num_warps=4),  # fwd 127 / 80, 128 / 94; bwd 164 / 123, 124 / 116
]

# The interpreter runs each program in numpy, so one small config (the tl.dot minimum of 16 and
# a few tiles per launch) keeps the tests fast and still exercises multi-tile loops and edges.
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _ia3_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, out_ptr, z_ptr, M, N, K,
    SCALE_INPUT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """SCALE_INPUT: out[M, N] = (x[M, K] * s[K]) @ W[N, K]^T + bias[N].
    Otherwise: z[M, N] = x @ W^T + bias and out = z * s[N].
    """
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Edge rows / columns are wrapped onto valid ones for the loads (their results are never
    # stored), so only the K edge needs a load mask inside the main loop.
    rows = offs_m % M
    cols = offs_n % N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        if SCALE_INPUT:
            # x * s rounded to the input dtype once, as eager PyTorch rounds it, so the dot
            # keeps its 16-bit tensor-core operands.
            s = tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * s[None, :]).to(x_ptr.dtype.element_ty)
        w_t = tl.load(w_ptr + cols[None, :] * K + offs_k[:, None], mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x, w_t, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    offs = offs_m[:, None] * N + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if not SCALE_INPUT:
        tl.store(z_ptr + offs, acc.to(z_ptr.dtype.element_ty), mask=mask)
        acc = acc * tl.load(scale_ptr + cols).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ia3_bwd_kernel(
    dy_ptr, w_ptr, unscaled_ptr, scale_ptr, dx_ptr, ds_ptr, M, N, K,
    SCALE_INPUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """SCALE_INPUT (unscaled = x [M, K], s [K]): g = dY[M, N] @ W[N, K], dx = g * s and
    ds[pid_m, K] = Σ_rows g * x. Otherwise (unscaled = z [M, N], s [N]): dx = (dY * s) @ W and
    ds[pid_m, N] = Σ_rows dY * z, written by the programs of the first K-column tile.

    ds (fp32) holds one row per BLOCK_M row tile. GEMM naming: the output tile is BLOCK_M x
    BLOCK_N over (M, K); BLOCK_K steps through N.

    NOTE (output scale, ds): the sum rides on the dY tiles the dx GEMM loads anyway and reads z
    once, where a reduction kernel of its own would read dY and z again (2·M·N elements: 64 MiB
    at M = N = K = 4096 in bf16; estimated at 1.5 TB/s against the GEMM's 2·4096³ flops at 250
    TFLOP/s, 8 % more time). It costs the programs of the first K-column tile a z load per step,
    and registers: 5-64 more than the same kernel without ds (146-196 on sm_80, 123-197 on
    sm_90), no spills. The z load is not pipelined by Triton (it feeds no dot); prefetching it
    one step ahead in registers spilled (8 B at 64x128x32 / 4 warps on sm_80), and a load
    masked by ``pid_n == 0`` instead of the branch reached 250 registers at 128x128x64 on sm_80.
    """
    pid_m, pid_n = grouped_tile(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % K
    m_ok = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        # int64: N * K may pass 2**31 (an LM head), unlike the other loop-index products here.
        offs_red = n0 + tl.arange(0, BLOCK_K).to(tl.int64)
        red_ok = offs_red < N
        dy = tl.load(dy_ptr + rows[:, None] * N + offs_red[None, :], mask=red_ok[None, :], other=0.0)
        if not SCALE_INPUT:
            if pid_n == 0:
                # Rows past M are loaded as 0 from z: they must not reach the sum over M.
                z = tl.load(unscaled_ptr + rows[:, None] * N + offs_red[None, :],
                            mask=m_ok[:, None] & red_ok[None, :], other=0.0)
                tl.store(ds_ptr + pid_m * N + offs_red, tl.sum(dy.to(tl.float32) * z.to(tl.float32), axis=0),
                         mask=red_ok)
            s = tl.load(scale_ptr + offs_red, mask=red_ok, other=0.0).to(tl.float32)
            dy = (dy.to(tl.float32) * s[None, :]).to(dy_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs_red[:, None] * K + cols[None, :], mask=red_ok[:, None], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    if SCALE_INPUT:
        x = tl.load(unscaled_ptr + rows[:, None] * K + cols[None, :], mask=m_ok[:, None], other=0.0)
        tl.store(ds_ptr + pid_m * K + offs_n, tl.sum(acc * x.to(tl.float32), axis=0), mask=offs_n < K)
        acc = acc * tl.load(scale_ptr + cols).to(tl.float32)[None, :]
    tl.store(dx_ptr + offs_m[:, None] * K + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_n < K)[None, :])


# SCALE_INPUT is part of the key: the two modes are different kernels with different costs.
ia3_fwd_kernel = triton.autotune(GEMM_CONFIGS, key=["M", "N", "K", "SCALE_INPUT"])(_ia3_fwd_kernel)
# The partial buffer is zeroed before every timing run and before the final run, so rows a
# taller tile leaves unwritten hold no values of another config's run.
ia3_bwd_kernel = triton.autotune(GEMM_CONFIGS, key=["M", "N", "K", "SCALE_INPUT"],
                                 reset_to_zero=["ds_ptr"])(_ia3_bwd_kernel)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compiles (triton_kernels.aot)
# --------------------------------------------------------------------------------------------


def _aot_signatures(dtype: str, flags: dict) -> dict:
    """Runtime argument types of each kernel for ``dtype`` inputs."""
    t = f"*{dtype}"
    sizes = {"M": "i32", "N": "i32", "K": "i32"}
    return {
        "fwd": {"x_ptr": t, "w_ptr": t, "bias_ptr": t, "scale_ptr": t, "out_ptr": t, "z_ptr": t, **sizes},
        # ds is an fp32 buffer of per-row-tile partial sums.
        "bwd": {"dy_ptr": t, "w_ptr": t, "unscaled_ptr": t, "scale_ptr": t, "dx_ptr": t, "ds_ptr": "*fp32", **sizes},
    }


AOT = AotSpec(
    # The bias each way (present first, the heavier); the scale's side is the variant.
    kernels={
        "fwd": (ia3_fwd_kernel, {"HAS_BIAS": (True, False)}),
        "bwd": (ia3_bwd_kernel, {}),
    },
    signatures=_aot_signatures,
    # No size changes the tiles: each kernel is compiled with the scale on the output (0) and on
    # the input (1) side.
    variants=(0, 1),
    sweep_variants=(0, 1),
    variant_tag="scale_input",
    variant_constexprs=lambda kernel, side: {"SCALE_INPUT": bool(side)},
    # Pointers from the caching allocator are 16-byte aligned, and the feature sizes N, K of real
    # layers are multiples of 16: the specialisation the JIT makes at run time.
    divisible=lambda signature: tuple(name for name in signature if name.endswith("_ptr") or name in ("N", "K")),
)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _partial_rows(M: int) -> int:
    """Rows of the ds partial buffer: one per row tile of the shortest BLOCK_M that may run.

    NOTE: ds = Σ over M is split across row tiles. Each tile stores its partial sum to a row of
    its own (no atomics), so ds does not depend on the order programs finish, and torch sums the
    rows: at M = 8192, N = K = 4096 and 64-row tiles that is a 128 x 4096 fp32 buffer (2 MiB)
    against the 64 MiB of bf16 dY the GEMM reads. fp32 atomics into one row would save only that
    row sum (one small launch): they need a zeroed buffer and a final cast all the same.
    """
    block_m = _INTERPRETER_CONFIG["BLOCK_M"] if interpreted() else min(c.kwargs["BLOCK_M"] for c in GEMM_CONFIGS)
    return triton.cdiv(M, block_m)


def ia3_linear_fwd(x, weight, bias, scale, scale_input: bool):
    """Forward of ia3_linear.

    x ``[M, K]``, weight ``[N, K]``, bias ``[N]`` or None, scale ``[K]`` (scale_input) or ``[N]``.
    Returns ``(out [M, N], unscaled)`` in x's dtype: ``out = (x * scale) W^T + bias`` and an
    empty ``[0, N]`` unscaled for an input scale; ``out = (x W^T + bias) * scale`` and the
    unscaled projection ``z = x W^T + bias`` ``[M, N]`` (what backward needs) for an output scale.
    """
    assert x.dim() == 2 and weight.dim() == 2 and scale.dim() == 1
    x, weight, scale = x.contiguous(), weight.contiguous(), scale.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    z = torch.empty((0 if scale_input else M, N), dtype=x.dtype, device=x.device)
    # K = 0 still launches: the loop is empty and the epilogue writes the (scaled) bias or 0.
    if M > 0 and N > 0:
        launch(
            ia3_fwd_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
            x, weight, bias, scale, out, z, M, N, K, interpreter_config=_INTERPRETER_CONFIG,
            SCALE_INPUT=scale_input, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype),
        )
    return out, z


def ia3_linear_bwd(grad_out, unscaled, weight, scale, scale_input: bool):
    """Backward of ia3_linear for x and the scale.

    grad_out ``[M, N]``, weight ``[N, K]``, scale ``[K]`` (scale_input) or ``[N]``; unscaled is
    the tensor the scale multiplied: x ``[M, K]`` for an input scale, z ``[M, N]`` from the
    forward for an output scale. Returns ``(dx [M, K], dscale)``: dx in grad_out's dtype, dscale
    in scale's shape and dtype, summed over M in fp32.
    """
    assert grad_out.dim() == 2 and unscaled.dim() == 2 and weight.dim() == 2 and scale.dim() == 1
    grad_out, unscaled = grad_out.contiguous(), unscaled.contiguous()
    weight, scale = weight.contiguous(), scale.contiguous()
    M, N = grad_out.shape
    K = weight.shape[1]
    dx = torch.empty((M, K), dtype=grad_out.dtype, device=grad_out.device)
    partial = torch.zeros((_partial_rows(M), scale.shape[0]), dtype=torch.float32, device=grad_out.device)
    if M > 0 and K > 0:
        # N = 0 still launches: the loop is empty, dx and the ds partials are written as 0.
        launch(
            ia3_bwd_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),),
            grad_out, weight, unscaled, scale, dx, partial, M, N, K, interpreter_config=_INTERPRETER_CONFIG,
            SCALE_INPUT=scale_input, DOT_PRECISION=dot_precision(grad_out.dtype),
        )
    elif not scale_input and M > 0:
        # K = 0: dx is empty, so no GEMM program exists to carry ds = Σ dY * z; a layer without
        # inputs is not a shape worth a kernel.
        partial = (grad_out.float() * unscaled.float()).sum(0, keepdim=True)
    return dx, partial.sum(0).to(scale.dtype)
