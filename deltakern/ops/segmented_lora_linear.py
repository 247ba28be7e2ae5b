"""``segmented_lora_linear``: many LoRA adapters in one batch (checks, segments, seeds, backend
dispatch, torch.library registration and autograd).

Each row of x belongs to one adapter (or to none). The op runs one base GEMM over all rows, then
per adapter a shrink ``xa_i = drop_i(x_i) A_iᵀ`` and an expand ``y_i += s_i xa_i B_iᵀ`` over that
adapter's rows only; backward gives each adapter ``dA_i``, ``dB_i`` from its own rows. Which rows
belong to which adapter is a :class:`LoraSegments`, computed once per batch (one host sync) and
shared by every layer of a model.

The C++ op pair ``torch.ops.deltakern.segmented_lora_linear_fwd/_bwd`` (CPU and CUDA) and the
Triton pair ``deltakern::segmented_lora_linear_fwd_triton/_bwd_triton`` share one autograd
formula. Backward saves x (the caller's tensor), the per-adapter ``xa_i`` (``[M_i, r_i]``), the
weights by reference and the seeds; dropout masks are regenerated, never stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..backend import BACKENDS, select_backend
from ..reference import segmented_lora_linear as reference
from ..registry import OpSpec, register_op
from ._common import (
    SEED_LIMIT,
    as_rows,
    check_backend_dtype,
    check_finite,
    check_low_rank_factors,
    check_probability,
    check_same,
    check_seed,
    check_tensor,
    register_backends,
    seed_tensor,
)

_OP = "segmented_lora_linear"
# Adapter i's dropout seed is seed + i·φ (mod 2**63), φ the 64-bit golden-ratio constant reduced
# mod 2**63: Philox keys that differ in many bits, so adapters never share a mask.
_SEED_STRIDE = 0x9E3779B97F4A7C15 % SEED_LIMIT


@dataclass(frozen=True)
class LoraSegments:
    """Which rows of a batch belong to which adapter, for :func:`segmented_lora_linear`.

    order: int64 ``[M_active]`` on the batch's device, the rows of adapter 0 (ascending), then
        those of adapter 1, ...; rows of no adapter (index -1) are left out.
    offsets: ``n + 1`` ints; adapter i's rows are ``order[offsets[i]:offsets[i + 1]]``.
    num_rows: M, the rows of the batch (those of no adapter included).
    """

    order: torch.Tensor
    offsets: tuple[int, ...]
    num_rows: int

    @property
    def num_adapters(self) -> int:
        return len(self.offsets) - 1

    def adapter_index(self) -> torch.Tensor:
        """The int64 ``[M]`` adapter index these segments were built from (-1: no adapter)."""
        counts = torch.tensor([b - a for a, b in zip(self.offsets, self.offsets[1:])], device=self.order.device)
        index = torch.full((self.num_rows,), -1, dtype=torch.int64, device=self.order.device)
        index[self.order] = torch.repeat_interleave(torch.arange(self.num_adapters, device=self.order.device), counts)
        return index


def lora_segments(adapter_index: torch.Tensor, num_adapters: int) -> LoraSegments:
    """The :class:`LoraSegments` of an adapter index.

    Args:
        adapter_index: integer tensor of any shape (flattened to ``[M]``, the rows of x
            ``[..., in]`` in order), values in ``[-1, num_adapters)``; -1 = the base only.
        num_adapters: n, the number of adapters the op will get.

    Reads the counts to the host once: build it once per batch and hand it to every layer.
    """
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.is_floating_point() \
            or adapter_index.is_complex() or adapter_index.dtype == torch.bool:
        raise ValueError(f"deltakern.{_OP}: the adapter index must be an integer tensor, got "
                         f"{adapter_index.dtype if isinstance(adapter_index, torch.Tensor) else type(adapter_index).__name__}")
    if isinstance(num_adapters, bool) or not isinstance(num_adapters, int) or num_adapters < 1:
        raise ValueError(f"deltakern.{_OP}: num_adapters must be an int >= 1, got {num_adapters!r}")
    index = adapter_index.reshape(-1).to(torch.int64)
    if index.numel():
        low, high = torch.stack(torch.aminmax(index)).tolist()  # one host read for both bounds
        if low < -1 or high >= num_adapters:
            raise ValueError(f"deltakern.{_OP}: adapter index values must lie in [-1, {num_adapters}), got "
                             f"[{low}, {high}]")
    # A stable sort keeps each adapter's rows ascending: the dropout contract numbers them in order.
    keys = torch.where(index < 0, num_adapters, index)
    order = torch.sort(keys, stable=True).indices
    counts = torch.bincount(keys, minlength=num_adapters + 1)[:num_adapters].tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return LoraSegments(order[: offsets[-1]].contiguous(), tuple(offsets), index.numel())


def adapter_seeds(seed: torch.Tensor, num_adapters: int) -> torch.Tensor:
    """int64 CPU ``[n]``: adapter i's dropout seed ``(seed + i·φ) mod 2**63`` for the 0-d int64 seed."""
    stride = torch.arange(num_adapters, dtype=torch.int64) * _SEED_STRIDE  # wraps mod 2**64
    return (seed + stride) & (SEED_LIMIT - 1)


@torch.library.custom_op("deltakern::segmented_lora_linear_fwd_triton", mutates_args=())
def _triton_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    scalings: list[float],
    dropout_p: list[float],
    order: torch.Tensor,
    offsets: list[int],
    seeds: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from ..triton_kernels.segmented_lora_linear import segmented_lora_linear_fwd

    return segmented_lora_linear_fwd(x, weight, bias, lora_A, lora_B, scalings, dropout_p, order, offsets, seeds)


@torch.library.custom_op("deltakern::segmented_lora_linear_bwd_triton", mutates_args=())
def _triton_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    xa: list[torch.Tensor],
    scalings: list[float],
    dropout_p: list[float],
    order: torch.Tensor,
    offsets: list[int],
    seeds: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    from ..triton_kernels.segmented_lora_linear import segmented_lora_linear_bwd

    return segmented_lora_linear_bwd(grad_out, x, weight, lora_A, lora_B, xa, scalings, dropout_p, order, offsets,
                                     seeds)


def _fwd_fake(x, weight, bias, lora_A, lora_B, scalings, dropout_p, order, offsets, seeds):
    xa = [x.new_empty(offsets[i + 1] - offsets[i], a.shape[0]) for i, a in enumerate(lora_A)]
    return x.new_empty(x.shape[0], weight.shape[0]), xa


def _bwd_fake(grad_out, x, weight, lora_A, lora_B, xa, scalings, dropout_p, order, offsets, seeds):
    return torch.empty_like(x), [torch.empty_like(a) for a in lora_A], [torch.empty_like(b) for b in lora_B]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scalings, dropout_p, order, offsets, seeds = inputs
    _, xa = output
    ctx.mark_non_differentiable(*xa)
    ctx.save_for_backward(x, weight, order, seeds, *lora_A, *lora_B, *xa)
    ctx.num_adapters = len(lora_A)
    ctx.scalings, ctx.dropout_p, ctx.offsets = scalings, dropout_p, offsets


def _make_backward(bwd_op):
    def backward(ctx, grad_out, _grad_xa):
        x, weight, order, seeds, *factors = ctx.saved_tensors
        n = ctx.num_adapters
        lora_A, lora_B, xa = factors[:n], factors[n:2 * n], factors[2 * n:]
        dx, d_lora_A, d_lora_B = bwd_op(grad_out, x, weight, lora_A, lora_B, xa, ctx.scalings, ctx.dropout_p,
                                        order, ctx.offsets, seeds)
        d_weight = grad_out.t().mm(x) if ctx.needs_input_grad[1] else None
        d_bias = grad_out.sum(0) if ctx.needs_input_grad[2] else None
        return dx, d_weight, d_bias, list(d_lora_A), list(d_lora_B), None, None, None, None, None

    return backward


_FWD_OPS = register_backends(_OP, _triton_fwd, _triton_bwd, _fwd_fake, _bwd_fake, _make_backward, _setup_context)
SPEC = register_op(OpSpec(name=_OP, cli_name="multi-lora", reference=reference.segmented_lora_linear,
                          backends=BACKENDS, cuda_tensor_cores="cuBLAS"))


def _as_list(op: str, name: str, value) -> list:
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"deltakern.{op}: {name} must be a list or tuple (one entry per adapter), got "
                         f"{type(value).__name__}")
    return list(value)


def _check_inputs(x, weight, bias, lora_A, lora_B, scalings, dropout_p):
    check_tensor(_OP, "x", x)
    if x.dim() < 1:
        raise ValueError(f"deltakern.{_OP}: x must have shape [..., in], got a 0-D tensor")
    if not x.dtype.is_floating_point:
        raise ValueError(f"deltakern.{_OP}: x must be a floating-point tensor, got {x.dtype}")
    check_tensor(_OP, "weight", weight, 2)
    if bias is not None:
        check_tensor(_OP, "bias", bias, 1)
    lora_A = _as_list(_OP, "lora_A", lora_A)
    lora_B = _as_list(_OP, "lora_B", lora_B)
    scalings = _as_list(_OP, "scalings", scalings)
    n = len(lora_A)
    if n == 0:
        raise ValueError(f"deltakern.{_OP}: lora_A is empty; give at least one adapter")
    if len(lora_B) != n or len(scalings) != n:
        raise ValueError(f"deltakern.{_OP}: lora_A, lora_B and scalings need one entry per adapter, got "
                         f"{n}, {len(lora_B)} and {len(scalings)}")
    if isinstance(dropout_p, Sequence) and not isinstance(dropout_p, str):
        dropout_p = list(dropout_p)
        if len(dropout_p) != n:
            raise ValueError(f"deltakern.{_OP}: dropout_p needs one entry per adapter ({n}), got {len(dropout_p)}")
    else:
        dropout_p = [dropout_p] * n
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"deltakern.{_OP}: x has {x.shape[-1]} input features, weight [out, in] expects in={in_features}")
    check_same(_OP, "x", x, {"weight": weight, "bias": bias})
    for i, (a, b) in enumerate(zip(lora_A, lora_B)):
        check_tensor(_OP, f"lora_A[{i}]", a, 2)
        check_tensor(_OP, f"lora_B[{i}]", b, 2)
        check_same(_OP, "x", x, {f"lora_A[{i}]": a, f"lora_B[{i}]": b})
        check_low_rank_factors(f"{_OP} (adapter {i})", in_features, out_features, bias, a, b)
    scalings = [check_finite(_OP, f"scalings[{i}]", s) for i, s in enumerate(scalings)]
    dropout_p = [check_probability(_OP, f"dropout_p[{i}]", p) for i, p in enumerate(dropout_p)]
    return lora_A, lora_B, scalings, dropout_p


def _check_segments(segments, x: torch.Tensor, num_rows: int, n: int) -> LoraSegments:
    if isinstance(segments, torch.Tensor):
        if segments.numel() != num_rows or (segments.dim() > 1 and tuple(segments.shape) != tuple(x.shape[:-1])):
            raise ValueError(f"deltakern.{_OP}: the adapter index must have shape {tuple(x.shape[:-1])} or "
                             f"[{num_rows}] (one entry per row of x), got {tuple(segments.shape)}")
        segments = lora_segments(segments.to(x.device), n)
    elif not isinstance(segments, LoraSegments):
        raise ValueError(f"deltakern.{_OP}: segments must be a LoraSegments (deltakern.lora_segments) or an "
                         f"integer adapter index tensor, got {type(segments).__name__}")
    if segments.num_rows != num_rows:
        raise ValueError(f"deltakern.{_OP}: segments cover {segments.num_rows} rows, x has {num_rows}")
    if segments.num_adapters != n:
        raise ValueError(f"deltakern.{_OP}: segments were built for {segments.num_adapters} adapters, "
                         f"the call has {n}")
    if segments.order.device != x.device:
        raise ValueError(f"deltakern.{_OP}: segments are on {segments.order.device}, x is on {x.device}")
    return segments


def segmented_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scalings: Sequence[float],
    segments: LoraSegments | torch.Tensor,
    dropout_p: float | Sequence[float] = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Many LoRA adapters in one batch: ``y[m] = x[m] Wᵀ + b + s_a · (drop_a(x[m]) A_aᵀ) B_aᵀ``
    with ``a`` the adapter of row m (none: ``y[m] = x[m] Wᵀ + b``).

    One base GEMM covers every row; each adapter's shrink and expand run over its own rows only,
    and backward gives each adapter the gradients of its own rows (an adapter with no rows gets
    zeros). The caller's row order is kept.

    Args:
        x: ``[..., in]`` input; its rows are ``x.reshape(-1, in)``.
        weight: ``[out, in]`` base weight, shared by all adapters (its gradient only when it
            requires grad); bias: ``[out]`` or None.
        lora_A: n tensors ``A_i [r_i, in]`` (ranks may differ).
        lora_B: n tensors ``B_i [out, r_i]``.
        scalings: n floats, adapter i's ``alpha_i / r_i``.
        segments: a :class:`LoraSegments` from :func:`lora_segments` (build it once per batch and
            share it between layers), or the adapter index itself, an integer tensor shaped
            ``x.shape[:-1]`` (or ``[M]``) with values in ``[-1, n)``.
        dropout_p: one probability for all adapters or one per adapter, each in [0, 1).
        seed: Philox seed (int in [0, 2**63)), None to draw one from torch's default generator.
            Adapter i's rows, in ascending order, drop exactly as ``lora_linear`` drops them as
            one ``[M_i, in]`` input with seed ``adapter_seeds(seed, n)[i]``; every backend
            draws the same masks.

    Returns:
        ``[..., out]`` in x's dtype.

    Raises:
        ValueError: a shape, dtype, device, list length or index is wrong (the message names it).
        BackendUnavailableError: a forced backend cannot run this call.
    """
    lora_A, lora_B, scalings, dropout_p = _check_inputs(x, weight, bias, lora_A, lora_B, scalings, dropout_p)
    x2d = as_rows(x)
    segments = _check_segments(segments, x, x2d.shape[0], len(lora_A))
    if seed is not None:
        check_seed(_OP, seed)
    backend = select_backend(_OP, x.device.type, x.dtype)
    check_backend_dtype(_OP, backend, x.dtype)
    seeds = adapter_seeds(seed_tensor(seed, max(dropout_p)), len(lora_A))
    if backend == "reference":
        out2d = reference.segmented_lora_linear(x2d, weight, bias, lora_A, lora_B, scalings,
                                                segments.adapter_index(), dropout_p, seeds.tolist())
    else:
        out2d, _ = _FWD_OPS[backend](x2d, weight, bias, lora_A, lora_B, scalings, dropout_p, segments.order,
                                     list(segments.offsets), seeds)
    return out2d.reshape(*x.shape[:-1], weight.shape[0])
