"""Triton kernels and launchers of ``prefix_attention``.

Shapes (contiguous): q ``[B, Hq, Lq, D]``; k, v ``[B, Hkv, Lk, D]``; prefix_k, prefix_v
``[Hkv, P, D]`` (shared by the batch) or ``[B, Hkv, P, D]``; key_padding_mask ``[B, Lk]``
(True = keep) or None; lse ``[B, Hq, Lq]`` fp32. Query head h uses kv head ``h // (Hq // Hkv)``:
the kernels map heads themselves, k/v and the prefix are never repeated, expanded or concatenated.

Visibility (reference/prefix_attention.py): every query sees all P prefix keys; input key j is
visible to query i when it is not padded and, with ``causal``, when ``j <= i + Lk - Lq``
(bottom-right alignment). A row with no visible key has out = 0, lse = -inf and zero gradients.

Forward, one kernel (FlashAttention-2): a program owns BLOCK_M query rows of one head and walks
the key blocks with an online softmax in the base-2 domain, in one loop: first the P prefix keys
(read from the prefix tensor, only the P edge masked), then the input keys (padding mask, and
with ``causal`` the bottom-right mask). Key blocks past the causal diagonal of the whole query
block are never visited. It stores out and lse.

Backward, three kernels (FlashAttention-2):
  1. preprocess  ``delta = rowsum(dO * O)``                                 ``[B, Hq, Lq]``
  2. dK/dV       one program per key block (prefix blocks first, then input blocks) and kv
                 head: it loops over the Hq / Hkv query heads of its group and the query blocks
                 that see the block, so dK/dV of the input keys and of a per-batch prefix are
                 written once, without atomics. A shared prefix is summed over the batch with
                 fp32 atomics into one ``[Hkv, P, D]`` buffer: the prefix is short (a few
                 blocks), so giving each batch element its own program keeps B x more CTAs in
                 flight than a program looping over the batch, and the atomic traffic is only
                 ``B * Hkv * P * D`` adds, no ``[B, Hkv, P, D]`` temporary.
  3. dQ          one program per query block and head, the forward's key walk again. A separate
                 kernel rather than atomics from kernel 2: dq is written once in q's dtype
                 (no fp32 ``[B, Hq, Lq, D]`` buffer, deterministic), at the price of recomputing
                 ``Q K^T`` once more (the FlashAttention-2 Triton tutorial's choice too).

Scores are kept in the base-2 domain (``s * scale * log2(e)``) so the kernels use ``exp2``;
lse is stored in the natural base. The head dim is a constexpr (strides known at compile time)
padded to ``BLOCK_D``, a power of two >= 16, with masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltakern.triton_kernels.common import AotSpec, dot_precision, launch

# --------------------------------------------------------------------------------------------
# Autotune configurations (sm_80 / sm_90), one small config for the interpreter
# --------------------------------------------------------------------------------------------

# Every config below is checked by tests/triton_kernels/test_compile.py to
# compile without register spills on sm_80 and sm_90, fp16 and bf16, for head dims 64 and 128
# (BLOCK_D 128 is the register high-water mark; 80 and 96 pad to 128). sm_80 is the tight target:
# mma.sync keeps both dot operands in registers, where sm_90's wgmma reads one from shared memory
# (the same tile takes 150-200 registers there against 230-255 on sm_80). Numbers below are
# sm_80 fp16 at D = 128 (ptxas -v).
#
# Forward: 128x64 on 8 warps is the FlashAttention-2 throughput tile (255 registers, no spill;
# 128x64 on 2 stages or 128x32 on 4 warps spill, 24-32 B); 128x32 / 8 warps (236) is its smaller-
# smem twin; 64x64 and 64x32 on 4 warps (255 / 228) give twice the CTAs when B * Hq * Lq / 128
# would not fill the GPU (short sequences, decoding).
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_stages=4, num_warps=4),
]

# dK/dV: a program keeps k, v (dot operands) and the dk, dv accumulators of its key block in
# registers, 4 x [BLOCK_N, D], and streams q, dO. At D = 128 that leaves room for 64 keys on 8
# warps (32x64: 228 registers) or 32 keys on 4 (32x32: 246), which doubles the CTAs for short
# sequences. Larger 4-warp tiles spilled (16x64: 300 B, 32x64: 432 B, 64x64: 816 B), as did
# 32x128 (32-60 B) and 16x128 / 8 warps at D = 80 and 96 (20 B). ptxas is not monotonic here:
# 32x64 / 8 warps on 3 stages spilled 24 B at D = 64 (not at 128); on 4 stages it fits both.
DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_stages=3, num_warps=4),
]

# dQ: keeps q, dO and the dq accumulator of its query block and streams k, v. 128x32 / 8 warps
# (246 registers), 64x64 / 8 warps (192), 64x32 / 4 warps (236); 64x64 on 4 warps spilled 68 B.
DQ_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_stages=3, num_warps=4),
]

# delta = rowsum(dO * O) is a bandwidth-bound row reduction.
PREPROCESS_CONFIGS = [
    triton.Config({"BLOCK_M": 64}, num_stages=1, num_warps=4),
    triton.Config({"BLOCK_M": 128}, num_stages=1, num_warps=8),
]

# Under the interpreter: the tl.dot minimum of 16 and unequal query / key tiles, so multi-block
# loops, the prefix / input boundary and the causal ranges are exercised at small sizes.
_INTERPRETER_CONFIG = {
    "fwd": {"BLOCK_M": 16, "BLOCK_N": 32},
    "dkdv": {"BLOCK_M": 32, "BLOCK_N": 16},
    "dq": {"BLOCK_M": 16, "BLOCK_N": 32},
    "preprocess": {"BLOCK_M": 16},
}

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_mask(row_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mask of a [rows, BLOCK_D] tile. Without head-dim padding it is [rows, 1]: one predicate per
    row, which keeps the loads vectorised."""
    if HEAD_DIM == BLOCK_D:
        return row_ok[:, None]
    else:
        return row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]


@triton.jit
def _key_block(t, prefix_blocks, pk_ptr, pv_ptr, k_ptr, v_ptr, kpm_ptr, P, Lk,
               BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """Key block t of the walk "prefix blocks, then input blocks": its keys' pointers and positions.

    Returns (k base, v base, key positions offs_n within their tensor, which exist and are kept
    (n_ok), whether the block is a prefix block). Scalar selects rather than branches keep the
    walk a single loop: two loops in a row (prefix, then input keys) raised the sm_80 forward from
    ~200 to 255 registers and made it spill.
    """
    is_prefix = t < prefix_blocks
    start_n = tl.where(is_prefix, t, t - prefix_blocks) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < tl.where(is_prefix, P, Lk)
    if HAS_MASK:
        # The padding mask covers input keys only.
        kept = tl.load(kpm_ptr + offs_n, mask=n_ok & (t >= prefix_blocks), other=0) != 0
        n_ok = n_ok & (kept | is_prefix)
    return tl.where(is_prefix, pk_ptr, k_ptr), tl.where(is_prefix, pv_ptr, v_ptr), offs_n, n_ok, is_prefix


@triton.jit
def _visible(offs_m, offs_n, n_ok, is_prefix, causal_shift, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N] visibility of the keys offs_n (kept: n_ok) to the queries offs_m: a
    prefix key is always visible, an input key j to query i when ``j <= i + causal_shift``."""
    visible = n_ok[None, :]
    if CAUSAL:
        visible = visible & ((offs_n[None, :] <= offs_m[:, None] + causal_shift) | is_prefix)
    return visible


@triton.jit
def _query_setup(Hq, Hkv, Lq, Lk, P, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 PREFIX_SHARED: tl.constexpr, HEAD_DIM: tl.constexpr):
    """For a (query block, batch * query head) program: head offsets and the key blocks to walk.

    Key blocks no row of the query block sees (past the causal diagonal) are not walked.
    Returns (pid_m, bh, b, q / out offset, prefix offset, k / v offset, prefix blocks, blocks).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    hk = (bh % Hq) // (Hq // Hkv)
    bhk = b * Hkv + hk
    if CAUSAL:
        # Query i sees input key j <= i + Lk - Lq: the last row of the block sees keys < hi.
        hi = tl.maximum(tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq), 0)
    else:
        hi = Lk
    prefix_blocks = tl.cdiv(P, BLOCK_N)
    blocks = prefix_blocks + tl.cdiv(hi, BLOCK_N)
    p_off = (hk if PREFIX_SHARED else bhk) * P * HEAD_DIM
    return pid_m, bh, b, bh * Lq * HEAD_DIM, p_off, bhk * Lk * HEAD_DIM, prefix_blocks, blocks


@triton.jit
def _prefix_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, kpm_ptr, out_ptr, lse_ptr,
    Hq, Hkv, Lq, Lk, P, scale, LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREFIX_SHARED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out, lse of BLOCK_M query rows of one (batch, query head). Grid: (cdiv(Lq, BLOCK_M), B * Hq).

    LQ_BUCKET / LK_BUCKET are only the autotune key (powers of two of Lq and P + Lk).
    """
    pid_m, bh, b, q_off, p_off, kv_off, prefix_blocks, blocks = _query_setup(
        Hq, Hkv, Lq, Lk, P, BLOCK_M, BLOCK_N, CAUSAL, PREFIX_SHARED, HEAD_DIM)
    # Positions within one head stay int32 (L * D < 2**31); the head's base offset is int64.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    tile = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tile_ok = _tile_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D)
    q = tl.load(q_ptr + q_off + tile, mask=tile_ok, other=0.0)
    qk_scale = scale * _LOG2E  # scores in the base-2 domain
    causal_shift = Lk - Lq
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for t in range(0, blocks):
        k_base, v_base, offs_n, n_ok, is_prefix = _key_block(
            t, prefix_blocks, pk_ptr + p_off, pv_ptr + p_off, k_ptr + kv_off, v_ptr + kv_off, kpm_ptr + b * Lk,
            P, Lk, BLOCK_N, HAS_MASK)
        kv_tile = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        kv_ok = _tile_mask(n_ok, offs_d, HEAD_DIM, BLOCK_D)
        k = tl.load(k_base + kv_tile, mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = _visible(offs_m, offs_n, n_ok, is_prefix, causal_shift, CAUSAL)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; subtracting 0 instead keeps exp2 finite
        # (exp2(-inf) = 0) where -inf - -inf would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kv_tile, mask=kv_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # A row without a visible key has l = 0 and acc = 0: out 0, lse -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    tl.store(out_ptr + q_off + tile, out.to(out_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(lse_ptr + bh * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _prefix_attn_bwd_preprocess_kernel(out_ptr, do_ptr, delta_ptr, rows,
                                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[r] = sum_d out[r, d] * dO[r, d] over the rows r = (b, h, i). Grid: (cdiv(rows, BLOCK_M),)."""
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = _tile_mask(offs_m < rows, offs_d, HEAD_DIM, BLOCK_D)
    offs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + offs_m, tl.sum(o * do, 1), mask=offs_m < rows)


@triton.jit
def _lse_base2(lse_ptr, offs_m, m_ok):
    """Row lse in base 2; a row without keys (-inf) and rows past Lq get +inf, so p = 0 there."""
    lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=float("inf")) * _LOG2E
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _prefix_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dpk_ptr, dpv_ptr,
    Hq, Hkv, Lq, Lk, P, scale, LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREFIX_SHARED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one key block of one (batch, kv head). Grid: (cdiv(P, BLOCK_N) + cdiv(Lk, BLOCK_N), B * Hkv).

    The first cdiv(P, BLOCK_N) programs take prefix blocks: their dK/dV go to dpk/dpv, stored for
    a per-batch prefix, added with fp32 atomics (pre-zeroed [Hkv, P, D]) for a shared one. The
    program loops over the Hq / Hkv query heads of its kv head and the query blocks that see it.
    """
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // Hkv
    hk = bhk % Hkv
    group = Hq // Hkv
    prefix_blocks = tl.cdiv(P, BLOCK_N)
    p_off = (hk if PREFIX_SHARED else bhk) * P * HEAD_DIM
    kv_off = bhk * Lk * HEAD_DIM
    k_base, v_base, offs_n, n_ok, is_prefix = _key_block(
        tl.program_id(0), prefix_blocks, pk_ptr + p_off, pv_ptr + p_off, k_ptr + kv_off, v_ptr + kv_off,
        kpm_ptr + b * Lk, P, Lk, BLOCK_N, HAS_MASK)
    offs_d = tl.arange(0, BLOCK_D)
    kv_tile = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    kv_ok = _tile_mask(offs_n < tl.where(is_prefix, P, Lk), offs_d, HEAD_DIM, BLOCK_D)
    k = tl.load(k_base + kv_tile, mask=kv_ok, other=0.0)
    v = tl.load(v_base + kv_tile, mask=kv_ok, other=0.0)
    qk_scale = scale * _LOG2E
    causal_shift = Lk - Lq
    lo = 0
    if CAUSAL:
        # Query rows before the block's first key - shift see none of it (prefix: every row sees it).
        first_n = tl.program_id(0) * BLOCK_N - prefix_blocks * BLOCK_N
        lo = tl.where(is_prefix, 0, (tl.maximum(first_n - causal_shift, 0) // BLOCK_M) * BLOCK_M)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for g in range(0, group):
        bh = b * Hq + hk * group + g
        q_base = q_ptr + bh * Lq * HEAD_DIM
        do_base = do_ptr + bh * Lq * HEAD_DIM
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Lq
            tile = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
            tile_ok = _tile_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D)
            q = tl.load(q_base + tile, mask=tile_ok, other=0.0)
            lse = _lse_base2(lse_ptr + bh * Lq, offs_m, m_ok)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
            visible = n_ok[:, None]
            if CAUSAL:
                visible = visible & ((offs_n[:, None] <= offs_m[None, :] + causal_shift) | is_prefix)
            p_t = tl.where(visible, tl.math.exp2(s_t - lse[None, :]), 0.0)
            do = tl.load(do_base + tile, mask=tile_ok, other=0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            delta = tl.load(delta_ptr + bh * Lq + offs_m, mask=m_ok, other=0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    dk = dk * scale

    if is_prefix:
        if PREFIX_SHARED:
            # Relaxed ordering: the partial sums over the batch only need atomicity.
            tl.atomic_add(dpk_ptr + hk * P * HEAD_DIM + kv_tile, dk, mask=kv_ok, sem="relaxed")
            tl.atomic_add(dpv_ptr + hk * P * HEAD_DIM + kv_tile, dv, mask=kv_ok, sem="relaxed")
        else:
            tl.store(dpk_ptr + p_off + kv_tile, dk.to(dpk_ptr.dtype.element_ty), mask=kv_ok)
            tl.store(dpv_ptr + p_off + kv_tile, dv.to(dpv_ptr.dtype.element_ty), mask=kv_ok)
    else:
        tl.store(dk_ptr + kv_off + kv_tile, dk.to(dk_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(dv_ptr + kv_off + kv_tile, dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


@triton.jit
def _prefix_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    Hq, Hkv, Lq, Lk, P, scale, LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREFIX_SHARED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of BLOCK_M query rows of one (batch, query head), the forward's key walk.

    Grid: (cdiv(Lq, BLOCK_M), B * Hq).
    """
    pid_m, bh, b, q_off, p_off, kv_off, prefix_blocks, blocks = _query_setup(
        Hq, Hkv, Lq, Lk, P, BLOCK_M, BLOCK_N, CAUSAL, PREFIX_SHARED, HEAD_DIM)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    tile = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tile_ok = _tile_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D)
    q = tl.load(q_ptr + q_off + tile, mask=tile_ok, other=0.0)
    do = tl.load(do_ptr + q_off + tile, mask=tile_ok, other=0.0)
    lse = _lse_base2(lse_ptr + bh * Lq, offs_m, m_ok)
    delta = tl.load(delta_ptr + bh * Lq + offs_m, mask=m_ok, other=0.0)
    qk_scale = scale * _LOG2E
    causal_shift = Lk - Lq
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for t in range(0, blocks):
        k_base, v_base, offs_n, n_ok, is_prefix = _key_block(
            t, prefix_blocks, pk_ptr + p_off, pv_ptr + p_off, k_ptr + kv_off, v_ptr + kv_off, kpm_ptr + b * Lk,
            P, Lk, BLOCK_N, HAS_MASK)
        kv_tile = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        kv_ok = _tile_mask(n_ok, offs_d, HEAD_DIM, BLOCK_D)
        k = tl.load(k_base + kv_tile, mask=kv_ok, other=0.0)
        v = tl.load(v_base + kv_tile, mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = _visible(offs_m, offs_n, n_ok, is_prefix, causal_shift, CAUSAL)
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + q_off + tile, (dq * scale).to(dq_ptr.dtype.element_ty), mask=tile_ok)


_ATTN_KEY = ["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "CAUSAL"]
prefix_attn_fwd_kernel = triton.autotune(FWD_CONFIGS, key=_ATTN_KEY)(_prefix_attn_fwd_kernel)
prefix_attn_bwd_preprocess_kernel = triton.autotune(PREPROCESS_CONFIGS, key=["rows", "HEAD_DIM"])(
    _prefix_attn_bwd_preprocess_kernel)
# The atomically accumulated shared-prefix gradients are zeroed before every timing run.
prefix_attn_bwd_dkdv_kernel = triton.autotune(DKDV_CONFIGS, key=_ATTN_KEY, reset_to_zero=["dpk_ptr", "dpv_ptr"])(
    _prefix_attn_bwd_dkdv_kernel)
prefix_attn_bwd_dq_kernel = triton.autotune(DQ_CONFIGS, key=_ATTN_KEY)(_prefix_attn_bwd_dq_kernel)



def block_d(head_dim: int) -> int:
    """The padded head-dim block: a power of two, at least 16 (tl.dot's smallest dimension)."""
    return max(16, triton.next_power_of_2(head_dim))


# --------------------------------------------------------------------------------------------
# Ahead-of-time compiles (triton_kernels.aot)
# --------------------------------------------------------------------------------------------

# Head dims compiled: 64; 80 and 96, which pad to BLOCK_D = 128 with masked columns; and 128,
# the register high-water mark. SWEEP_HEAD_DIMS are where every autotune config is compiled.
HEAD_DIMS = (64, 80, 96, 128)
SWEEP_HEAD_DIMS = (64, 96, 128)


def _aot_signatures(dtype: str, flags: dict) -> dict:
    """Runtime argument types of each kernel for ``dtype`` inputs and the constexpr ``flags``."""
    t = f"*{dtype}"
    inputs = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "pk_ptr": t, "pv_ptr": t, "kpm_ptr": "*u8"}
    sizes = {"Hq": "i32", "Hkv": "i32", "Lq": "i32", "Lk": "i32", "P": "i32", "scale": "fp32",
             "LQ_BUCKET": "i32", "LK_BUCKET": "i32"}
    saved = {"do_ptr": t, "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
    return {
        "fwd": {**inputs, "out_ptr": t, "lse_ptr": "*fp32", **sizes},
        "bwd_preprocess": {"out_ptr": t, "do_ptr": t, "delta_ptr": "*fp32", "rows": "i32"},
        # dprefix in fp32 for a shared prefix (buffers summed with atomics over the batch), in the
        # input dtype for a per-batch one.
        "bwd_dkdv": {**inputs, **saved, "dk_ptr": t, "dv_ptr": t, **sizes,
                     **dict.fromkeys(("dpk_ptr", "dpv_ptr"), "*fp32" if flags.get("PREFIX_SHARED") else t)},
        "bwd_dq": {**inputs, **saved, "dq_ptr": t, **sizes},
    }


# Every flag each way; the heaviest first: causal (two key ranges), a padding mask, a shared
# prefix (atomics).
_FLAGS = {"CAUSAL": (True, False), "HAS_MASK": (True, False), "PREFIX_SHARED": (True, False)}
AOT = AotSpec(
    kernels={
        "fwd": (prefix_attn_fwd_kernel, _FLAGS),
        "bwd_preprocess": (prefix_attn_bwd_preprocess_kernel, {}),
        "bwd_dkdv": (prefix_attn_bwd_dkdv_kernel, _FLAGS),
        "bwd_dq": (prefix_attn_bwd_dq_kernel, _FLAGS),
    },
    signatures=_aot_signatures,
    variants=HEAD_DIMS,
    sweep_variants=SWEEP_HEAD_DIMS,
    variant_tag="d",
    variant_constexprs=lambda kernel, d: {"HEAD_DIM": d, "BLOCK_D": block_d(d)},
    # Sequence lengths and head counts are arbitrary: only the (16-byte aligned) pointers.
    divisible=lambda signature: tuple(name for name in signature if name.endswith("_ptr")),
)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _common_args(q, k, prefix_k, key_padding_mask, causal: bool, scale: float):
    """Runtime scalars and constexprs shared by the attention kernels, and the mask as bytes."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    # The mask is read as bytes (a zero-copy view of the bool tensor); absent, a 1-byte dummy.
    if key_padding_mask is None:
        kpm = torch.ones(1, dtype=torch.uint8, device=q.device)
    else:
        kpm = key_padding_mask.contiguous().view(torch.uint8)
    # The autotune key buckets the lengths, so a decoding loop whose Lk grows by one per step
    # does not retune every step.
    scalars = (Hq, Hkv, Lq, Lk, P, float(scale), triton.next_power_of_2(Lq), triton.next_power_of_2(P + Lk))
    constexprs = dict(HEAD_DIM=D, CAUSAL=bool(causal), HAS_MASK=key_padding_mask is not None,
                      PREFIX_SHARED=prefix_k.dim() == 3, BLOCK_D=block_d(D), DOT_PRECISION=dot_precision(q.dtype))
    return kpm, scalars, constexprs


def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, causal: bool, scale: float):
    """Forward of prefix_attention.

    q ``[B, Hq, Lq, D]``; k, v ``[B, Hkv, Lk, D]``; prefix_k, prefix_v ``[Hkv, P, D]`` (shared)
    or ``[B, Hkv, P, D]``; key_padding_mask ``[B, Lk]`` bool (True = keep) or None; all contiguous.
    Returns out ``[B, Hq, Lq, D]`` in q's dtype and the row log-sum-exp lse ``[B, Hq, Lq]`` fp32
    (natural base, of the scaled scores; -inf for a row with no visible key, whose out is 0).
    """
    assert q.dim() == 4 and k.dim() == 4 and prefix_k.dim() in (3, 4)
    B, Hq, Lq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    kpm, scalars, constexprs = _common_args(q, k, prefix_k, key_padding_mask, causal, scale)
    launch(prefix_attn_fwd_kernel, lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq),
           q, k, v, prefix_k, prefix_v, kpm, out, lse, *scalars,
           interpreter_config=_INTERPRETER_CONFIG["fwd"], **constexprs)
    return out, lse


def prefix_attention_bwd(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal: bool,
                         scale: float):
    """Backward of prefix_attention: (dq, dk, dv, dprefix_k, dprefix_v), each shaped and typed like its input.

    grad_out and out ``[B, Hq, Lq, D]``, lse ``[B, Hq, Lq]`` fp32 from :func:`prefix_attention_fwd`;
    the other arguments as there. A shared prefix's gradient is summed over the batch.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    shared = prefix_k.dim() == 3
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if shared:
        # Summed over the batch with fp32 atomics (the result itself when the inputs are fp32).
        dpk = torch.zeros(prefix_k.shape, dtype=torch.float32, device=q.device)
        dpv = torch.zeros(prefix_v.shape, dtype=torch.float32, device=q.device)
    else:
        dpk = torch.empty_like(prefix_k)
        dpv = torch.empty_like(prefix_v)
    if q.numel() == 0 or k.numel() + prefix_k.numel() == 0:
        # No query row, or no key at all: every gradient is zero.
        return (dq.zero_(), dk.zero_(), dv.zero_(), dpk.zero_().to(prefix_k.dtype), dpv.zero_().to(prefix_v.dtype))
    grad_out = grad_out.contiguous()
    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    rows = B * Hq * Lq
    launch(prefix_attn_bwd_preprocess_kernel, lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),),
           out, grad_out, delta, rows,
           interpreter_config=_INTERPRETER_CONFIG["preprocess"], HEAD_DIM=D, BLOCK_D=block_d(D))
    kpm, scalars, constexprs = _common_args(q, k, prefix_k, key_padding_mask, causal, scale)
    launch(prefix_attn_bwd_dkdv_kernel,
           lambda meta: (triton.cdiv(P, meta["BLOCK_N"]) + triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv),
           q, k, v, prefix_k, prefix_v, kpm, grad_out, lse, delta, dk, dv, dpk, dpv, *scalars,
           interpreter_config=_INTERPRETER_CONFIG["dkdv"], **constexprs)
    launch(prefix_attn_bwd_dq_kernel, lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq),
           q, k, v, prefix_k, prefix_v, kpm, grad_out, lse, delta, dq, *scalars,
           interpreter_config=_INTERPRETER_CONFIG["dq"], **constexprs)
    if shared:
        dpk, dpv = dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
    return dq, dk, dv, dpk, dpv
