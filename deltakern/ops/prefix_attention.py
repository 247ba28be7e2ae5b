"""``prefix_attention``: checks, backend dispatch, torch.library registration and autograd.

The C++ op ``torch.ops.deltakern.prefix_attention_fwd`` (CPU and CUDA kernels from
``deltakern._C``) and the Triton op ``deltakern::prefix_attention_fwd_triton`` share one autograd
formula, registered with ``torch.library.register_autograd``; both have fake kernels, so
``torch.compile`` traces them without a graph break. Backward saves q, k, v, the prefix (by
reference), the output and the row log-sum-exp: nothing of size ``B × (P+Lk)`` or ``Lq × Lk``.
"""

from __future__ import annotations

import math

import torch

from ..backend import BACKENDS, select_backend
from ..reference import prefix_attention as reference
from ..registry import OpSpec, register_op
from ._common import check_backend_dtype, check_finite, check_same, check_tensor, register_backends

_OP = "prefix_attention"


@torch.library.custom_op("deltakern::prefix_attention_fwd_triton", mutates_args=())
def _triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton_kernels.prefix_attention import prefix_attention_fwd

    return prefix_attention_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)


@torch.library.custom_op("deltakern::prefix_attention_bwd_triton", mutates_args=())
def _triton_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton_kernels.prefix_attention import prefix_attention_bwd

    return prefix_attention_bwd(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale)


def _fwd_fake(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_fake(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale):
    return tuple(torch.empty_like(t) for t in (q, k, v, prefix_k, prefix_v))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _make_backward(bwd_op):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse = ctx.saved_tensors
        grads = bwd_op(grad_out.contiguous(), q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, ctx.causal, ctx.scale)
        return (*grads, None, None, None)

    return backward


_FWD_OPS = register_backends(_OP, _triton_fwd, _triton_bwd, _fwd_fake, _bwd_fake, _make_backward, _setup_context)
SPEC = register_op(OpSpec(name=_OP, cli_name="prefix", reference=reference.prefix_attention, backends=BACKENDS,
                           cuda_tensor_cores="SIMT"))


def _check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(_OP, name, t, 4)
    check_tensor(_OP, "prefix_k", prefix_k)
    check_tensor(_OP, "prefix_v", prefix_v)
    if not q.dtype.is_floating_point:
        raise ValueError(f"deltakern.{_OP}: q must be a floating-point tensor, got {q.dtype}")
    check_same(_OP, "q", q, {"k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v})
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"deltakern.{_OP}: k and v must have one shape [B, Hkv, Lk, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"deltakern.{_OP}: k must be [B={B}, Hkv, Lk, D={D}] like q [B, Hq, Lq, D], got {tuple(k.shape)}"
        )
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"deltakern.{_OP}: the query heads Hq={Hq} must be a multiple of the key/value heads Hkv={Hkv}")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(
            f"deltakern.{_OP}: prefix_k and prefix_v must have one shape, got {tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}"
        )
    expected = f"[Hkv={Hkv}, P, D={D}] or [B={B}, Hkv={Hkv}, P, D={D}]"
    if prefix_k.dim() == 3:
        ok = prefix_k.shape[0] == Hkv and prefix_k.shape[2] == D
    elif prefix_k.dim() == 4:
        ok = prefix_k.shape[0] == B and prefix_k.shape[1] == Hkv and prefix_k.shape[3] == D
    else:
        ok = False
    if not ok:
        raise ValueError(f"deltakern.{_OP}: prefix_k must be {expected}, got {tuple(prefix_k.shape)}")
    if key_padding_mask is not None:
        check_tensor(_OP, "key_padding_mask", key_padding_mask, 2)
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"deltakern.{_OP}: key_padding_mask must be bool (True = keep), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"deltakern.{_OP}: key_padding_mask must be [B={B}, Lk={Lk}], got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"deltakern.{_OP}: key_padding_mask is on {key_padding_mask.device}, expected {q.device} like q")


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over a trainable prefix plus the input keys, ``softmax(q [Pk; k]ᵀ · scale + mask) [Pv; v]``.

    The prefix of prefix tuning / P-tuning v2 is read where it lies: never expanded over the
    batch, concatenated into k/v, or turned into a dense mask.

    Args:
        q: ``[B, Hq, Lq, D]`` queries.
        k, v: ``[B, Hkv, Lk, D]`` input keys and values; ``Hq % Hkv == 0`` (GQA/MQA: query head h
            uses key/value head ``h // (Hq // Hkv)``).
        prefix_k, prefix_v: ``[Hkv, P, D]`` (one prefix shared by the batch) or ``[B, Hkv, P, D]``.
            P = 0 is plain attention.
        causal: causal masking of the input keys, aligned bottom-right as in FlashAttention:
            query i of Lq sees input key j of Lk when ``j <= i + Lk - Lq`` (so decoding with a KV
            cache works). The prefix is always visible.
        key_padding_mask: ``[B, Lk]`` bool, True = keep; applies to the input keys only.
        scale: score scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype. A query row with no visible key (only possible with
        P = 0) is zeros, never NaN, and gets zero gradients. Gradients flow to q, k, v, prefix_k
        and prefix_v (summed over the batch when the prefix is shared).

    Raises:
        ValueError: a shape, dtype, device or argument is wrong (the message names it).
        BackendUnavailableError: a forced backend cannot run this call.
    """
    _check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_finite(_OP, "scale", scale)
    backend = select_backend(_OP, q.device.type, q.dtype)
    check_backend_dtype(_OP, backend, q.dtype)
    if backend == "reference":
        return reference.prefix_attention(
            q, k, v, prefix_k, prefix_v, causal=causal, key_padding_mask=key_padding_mask, scale=scale
        )
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    tensors = (t.contiguous() for t in (q, k, v, prefix_k, prefix_v))
    out, _ = _FWD_OPS[backend](*tensors, mask, bool(causal), scale)
    return out
