"""``dora_linear`` (DoRA, weight-decomposed LoRA): checks, the row norms without an ``[out, in]``
temporary, backend dispatch, torch.library registration and autograd.

The row norms ``n = ‖W + s B A‖`` come from
``n² = ‖W‖²_row + 2s · rowsum((W Aᵀ) ⊙ B) + s² · rowsum((B (A Aᵀ)) ⊙ B)``: ``‖W‖²_row`` once per
weight (:class:`RowSqNormCache`), ``W Aᵀ`` ``[out, r]`` from one pass over W per call, the rest
``[out, r]`` and ``[r, r]`` products, all accumulated in fp32. ``n`` is a constant for autograd
(PEFT detaches it, as the DoRA paper's §4.3 advises); the kernels take the fp32 column scale
``c = magnitude / n`` and return its gradient ``Σ_rows dY ⊙ z``, from which autograd gives the
magnitude's (``dm = dc / n``).

The kernels (C++ ``torch.ops.deltakern.dora_linear_fwd``/``_bwd`` for CPU and CUDA, Triton
``deltakern::dora_linear_fwd_triton``/``_bwd_triton``) share one autograd formula. Forward
returns ``y``, ``xa = drop(x) Aᵀ`` ``[M, r]`` and, when the magnitude needs a gradient,
``z = drop(x) Wᵀ + s · xa Bᵀ`` ``[M, out]`` (the term the scale multiplies). Backward saves x
(the caller's tensor), the weights by reference, xa, z and the scale; the dropout mask is
regenerated from the seed. ``z`` is what the magnitude's gradient ``Σ_rows dY ⊙ z`` needs: the
alternative, recomputing ``drop(x) Wᵀ`` in backward, is a third GEMM as large as the forward's.
"""

from __future__ import annotations

import weakref

import torch

from ..backend import BACKENDS, select_backend
from ..reference import dora_linear as reference
from ..reference.lora_linear import dropout as reference_dropout
from ..registry import OpSpec, register_op
from ._common import (
    as_rows,
    check_backend_dtype,
    check_finite,
    check_low_rank_factors,
    check_probability,
    check_same,
    check_seed,
    check_tensor,
    draw_seed,
    register_backends,
    seed_tensor,
)

_OP = "dora_linear"


@torch.library.custom_op("deltakern::dora_linear_fwd_triton", mutates_args=())
def _triton_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    save_z: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton_kernels.dora_linear import dora_linear_fwd

    return dora_linear_fwd(x, weight, bias, lora_A, lora_B, scale, scaling, dropout_p, int(seed.item()), save_z)


@torch.library.custom_op("deltakern::dora_linear_bwd_triton", mutates_args=())
def _triton_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    xa: torch.Tensor,
    z: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton_kernels.dora_linear import dora_linear_bwd

    return dora_linear_bwd(grad_out, x, weight, lora_A, lora_B, scale, xa, z, scaling, dropout_p, int(seed.item()))


def _fwd_fake(x, weight, bias, lora_A, lora_B, scale, scaling, dropout_p, seed, save_z):
    m, n = x.shape[0], weight.shape[0]
    z = x.new_empty(m, n) if save_z else x.new_empty(0)
    return x.new_empty(m, n), x.new_empty(m, lora_A.shape[0]), z


def _bwd_fake(grad_out, x, weight, lora_A, lora_B, scale, xa, z, scaling, dropout_p, seed):
    d_scale = scale.new_empty(scale.shape[0] if z.dim() == 2 else 0)
    return torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B), d_scale


def _setup_context(ctx, inputs, output):
    x, weight, _, lora_A, lora_B, scale, scaling, dropout_p, seed, _ = inputs
    _, xa, z = output
    ctx.mark_non_differentiable(xa, z)
    ctx.save_for_backward(x, weight, lora_A, lora_B, scale, xa, z, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _weight_grad(grad_out, x, scale, dropout_p, seed):
    """dW (W is rarely trained under DoRA): ``(c ⊙ dY)ᵀ x`` without dropout, else
    ``dYᵀ x + ((c − 1) ⊙ dY)ᵀ drop(x)``; the norm is a constant, as in PEFT."""
    if dropout_p == 0.0:
        return (grad_out * scale).to(grad_out.dtype).t().mm(x)
    dropped = reference_dropout(x, dropout_p, seed)  # the seed tensor itself: no .item() under torch.compile
    return grad_out.t().mm(x) + (grad_out * (scale - 1)).to(grad_out.dtype).t().mm(dropped)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, _grad_xa, _grad_z):
        x, weight, lora_A, lora_B, scale, xa, z, seed = ctx.saved_tensors
        dx, d_lora_A, d_lora_B, d_scale = bwd_op(grad_out, x, weight, lora_A, lora_B, scale, xa, z, ctx.scaling,
                                                 ctx.dropout_p, seed)
        d_weight = _weight_grad(grad_out, x, scale, ctx.dropout_p, seed) if ctx.needs_input_grad[1] else None
        d_bias = grad_out.sum(0) if ctx.needs_input_grad[2] else None
        d_scale = d_scale if ctx.needs_input_grad[5] else None
        return dx, d_weight, d_bias, d_lora_A, d_lora_B, d_scale, None, None, None, None

    return backward


_FWD_OPS = register_backends(_OP, _triton_fwd, _triton_bwd, _fwd_fake, _bwd_fake, _make_backward, _setup_context)
SPEC = register_op(OpSpec(name=_OP, cli_name="dora", reference=reference.dora_linear, backends=BACKENDS,
                           cuda_tensor_cores="cuBLAS"))

# Rows of W converted to fp32 at a time for a low-precision weight: at most 2**20 values (4 MiB)
# and a sixteenth of the weight, so the fp32 block stays an eighth of the bf16 weight's bytes
# (1024 x 1024: 16 blocks of 64 rows; 4096 x 11008: 43 blocks of 95 rows).
_ROW_CHUNK_VALUES = 1 << 20
_ROW_CHUNK_FRACTION = 16


def _row_chunks(weight: torch.Tensor):
    """``weight [out, in]`` as fp32 row blocks (the weight itself when it is fp32 or fp64): never
    a whole low-precision ``[out, in]`` copy."""
    if weight.dtype in (torch.float32, torch.float64):
        yield weight
        return
    values = min(_ROW_CHUNK_VALUES, weight.numel() // _ROW_CHUNK_FRACTION)
    rows = max(1, values // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        yield weight[start:start + rows].float()


def weight_row_sqnorm(weight: torch.Tensor) -> torch.Tensor:
    """``‖W‖²`` of each row of ``weight [out, in]``, ``[out]`` fp32 (fp64 for an fp64 weight),
    without an ``[out, in]`` temporary."""
    with torch.no_grad():
        return torch.cat([torch.linalg.vector_norm(chunk, dim=1).square() for chunk in _row_chunks(weight)])


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     weight_sqnorm: torch.Tensor) -> torch.Tensor:
    """``‖W + s B A‖₂`` of each row, ``[out]`` fp32 (fp64 for fp64 inputs), detached, without
    forming ``B A``: ``n² = ‖W‖²_row + 2s · rowsum((W Aᵀ) ⊙ B) + s² · rowsum((B (A Aᵀ)) ⊙ B)``.

    weight ``[out, in]`` (a transposed view is fine), lora_A ``[r, in]``, lora_B ``[out, r]``,
    weight_sqnorm ``[out]`` (:func:`weight_row_sqnorm`). ``n²`` is clamped at 0 against
    cancellation, so a row of ``W + s B A`` that is exactly zero has n = 0 (and an infinite
    scale, as in PEFT)."""
    with torch.no_grad():
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        a = lora_A.to(acc)
        b = lora_B.to(acc)
        # W Aᵀ [out, r]: one pass over W, in row blocks converted to fp32 for a bf16/fp16 weight.
        wa = torch.cat([chunk.to(acc).mm(a.t()) for chunk in _row_chunks(weight)])
        cross = (wa * b).sum(1)
        lowrank = (b.mm(a.mm(a.t())) * b).sum(1)
        sq = weight_sqnorm.to(acc) + (2.0 * scaling) * cross + (scaling * scaling) * lowrank
        return sq.clamp_min_(0.0).sqrt_()


class RowSqNormCache:
    """``‖W‖²_row`` of one weight, kept between calls and recomputed when the weight changes: in
    place (its version counter moves: an optimizer step, ``merge_lora``, ``load_state_dict``) or
    replaced (another tensor, storage, layout, dtype or device; the tensor is held by weak
    reference, so a new weight allocated where a freed one was is still another tensor). Writes
    through ``weight.data`` bypass the version counter: call :meth:`clear` after one. Under
    torch.compile it is computed each call (a compiled graph cannot read version counters)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._owner = None
        self._key = None
        self._value = None

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return weight_row_sqnorm(weight)
        # A transposed view (Conv1D) is a new tensor each call: its base is the weight itself.
        owner = weight if weight._base is None else weight._base
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride(), weight.dtype, weight.device)
        if self._owner is None or self._owner() is not owner or key != self._key:
            self._value = weight_row_sqnorm(weight)
            self._owner = weakref.ref(owner)
            self._key = key
        return self._value


def _check_inputs(x, weight, bias, lora_A, lora_B, magnitude, weight_sqnorm) -> None:
    check_tensor(_OP, "x", x)
    if x.dim() < 1:
        raise ValueError(f"deltakern.{_OP}: x must have shape [..., in], got a 0-D tensor")
    check_tensor(_OP, "weight", weight, 2)
    check_tensor(_OP, "lora_A", lora_A, 2)
    check_tensor(_OP, "lora_B", lora_B, 2)
    check_tensor(_OP, "magnitude", magnitude, 1)
    if bias is not None:
        check_tensor(_OP, "bias", bias, 1)
    if not x.dtype.is_floating_point:
        raise ValueError(f"deltakern.{_OP}: x must be a floating-point tensor, got {x.dtype}")
    check_same(_OP, "x", x, {"weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B,
                             "magnitude": magnitude})
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"deltakern.{_OP}: x has {x.shape[-1]} input features, weight [out, in] expects in={in_features}")
    check_low_rank_factors(_OP, in_features, out_features, bias, lora_A, lora_B)
    if magnitude.shape[0] != out_features:
        raise ValueError(f"deltakern.{_OP}: magnitude must be [out={out_features}], got {tuple(magnitude.shape)}")
    if weight_sqnorm is not None:
        check_tensor(_OP, "weight_sqnorm", weight_sqnorm, 1)
        if weight_sqnorm.shape[0] != out_features:
            raise ValueError(f"deltakern.{_OP}: weight_sqnorm must be [out={out_features}], "
                             f"got {tuple(weight_sqnorm.shape)}")
        if weight_sqnorm.device != x.device:
            raise ValueError(f"deltakern.{_OP}: weight_sqnorm is on {weight_sqnorm.device}, expected {x.device} like x")


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int | None = None,
    weight_sqnorm: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA linear layer as one fused op, PEFT's ``DoraLinearLayer`` exactly.

    With ``n = ‖W + s·B A‖₂`` per output row (a constant for autograd, as in PEFT) and the
    column scale ``c = magnitude / n``:

    - ``dropout_p == 0`` (or eval): ``y = c ⊙ (x Wᵀ + s · (x Aᵀ) Bᵀ) + b``;
    - ``dropout_p > 0``: ``y = x Wᵀ + b + (c − 1) ⊙ (drop(x) Wᵀ) + c ⊙ s · (drop(x) Aᵀ) Bᵀ``
      (PEFT applies the magnitude correction to the dropped input).

    No backend but ``reference`` forms ``B A`` or any other ``[out, in]`` tensor: see the
    module docstring for the norm identity.

    Args:
        x: ``[..., in]`` input.
        weight: ``[out, in]`` base weight, usually frozen (its gradient is computed only when it
            requires grad). A transposed view (transformers' ``Conv1D``) is fine.
        bias: ``[out]`` base bias or None.
        lora_A: ``[r, in]`` down projection (r >= 1).
        lora_B: ``[out, r]`` up projection.
        magnitude: ``[out]`` DoRA magnitude vector (PEFT's ``lora_magnitude_vector``).
        scaling: the LoRA scale, ``alpha / r``.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1).
        seed: Philox seed of the dropout mask, as in :func:`deltakern.lora_linear` (same mask).
        weight_sqnorm: ``[out]`` fp32 ``‖W‖²`` of each row, when the caller caches it
            (:class:`RowSqNormCache`); None computes it.

    Returns:
        ``[..., out]`` in x's dtype.

    Raises:
        ValueError: a shape, dtype, device or argument is wrong (the message names it).
        BackendUnavailableError: a forced backend cannot run this call.
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, magnitude, weight_sqnorm)
    scaling = check_finite(_OP, "scaling", scaling)
    dropout_p = check_probability(_OP, "dropout_p", dropout_p)
    backend = select_backend(_OP, x.device.type, x.dtype)
    check_backend_dtype(_OP, backend, x.dtype)
    if seed is not None:
        check_seed(_OP, seed)
    x2d = as_rows(x)
    if backend == "reference":
        if seed is None:
            seed = int(draw_seed()) if dropout_p > 0.0 else 0
        out2d = reference.dora_linear(x2d, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed)
    else:
        if weight_sqnorm is None:
            weight_sqnorm = weight_row_sqnorm(weight)
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sqnorm)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        scale = magnitude.to(acc) / norm
        out2d, _, _ = _FWD_OPS[backend](x2d, weight, bias, lora_A, lora_B, scale, scaling, dropout_p,
                                        seed_tensor(seed, dropout_p),
                                        torch.is_grad_enabled() and magnitude.requires_grad)
    return out2d.reshape(*x.shape[:-1], weight.shape[0])
