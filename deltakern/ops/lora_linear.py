"""``lora_linear``: checks, backend dispatch, torch.library registration and autograd.

The C++ op ``torch.ops.deltakern.lora_linear_fwd`` (CPU and CUDA kernels from ``deltakern._C``)
and the Triton op ``deltakern::lora_linear_fwd_triton`` share one autograd formula, registered
with ``torch.library.register_autograd``; both have fake kernels, so ``torch.compile`` traces
them without a graph break. Backward saves x (the caller's tensor, not a copy), xa ``[M, r]``
and the weights by reference; the dropout mask is regenerated from the seed.
"""

from __future__ import annotations

import torch

from ..backend import BACKENDS, select_backend
from ..reference import lora_linear as reference
from ..registry import OpSpec, register_op
from ._common import (
    as_rows,
    check_backend_dtype,
    check_finite,
    check_probability,
    check_same,
    check_low_rank_factors,
    check_seed,
    check_tensor,
    draw_seed,
    register_backends,
    seed_tensor,
)

_OP = "lora_linear"


@torch.library.custom_op("deltakern::lora_linear_fwd_triton", mutates_args=())
def _triton_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton_kernels.lora_linear import lora_linear_fwd

    return lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, int(seed.item()))


@torch.library.custom_op("deltakern::lora_linear_bwd_triton", mutates_args=())
def _triton_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton_kernels.lora_linear import lora_linear_bwd

    return lora_linear_bwd(grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout_p, int(seed.item()))


def _fwd_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


def _bwd_fake(grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed):
    return torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _make_backward(bwd_op):
    def backward(ctx, grad_out, _grad_xa):
        x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
        dx, d_lora_A, d_lora_B = bwd_op(grad_out, x, weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, seed)
        d_weight = grad_out.t().mm(x) if ctx.needs_input_grad[1] else None
        d_bias = grad_out.sum(0) if ctx.needs_input_grad[2] else None
        return dx, d_weight, d_bias, d_lora_A, d_lora_B, None, None, None

    return backward


_FWD_OPS = register_backends(_OP, _triton_fwd, _triton_bwd, _fwd_fake, _bwd_fake, _make_backward, _setup_context)
SPEC = register_op(OpSpec(name=_OP, cli_name="lora", reference=reference.lora_linear, backends=BACKENDS,
                           cuda_tensor_cores="cuBLAS"))


def _check_inputs(x, weight, bias, lora_A, lora_B) -> None:
    check_tensor(_OP, "x", x)
    if x.dim() < 1:
        raise ValueError(f"deltakern.{_OP}: x must have shape [..., in], got a 0-D tensor")
    check_tensor(_OP, "weight", weight, 2)
    check_tensor(_OP, "lora_A", lora_A, 2)
    check_tensor(_OP, "lora_B", lora_B, 2)
    if bias is not None:
        check_tensor(_OP, "bias", bias, 1)
    if not x.dtype.is_floating_point:
        raise ValueError(f"deltakern.{_OP}: x must be a floating-point tensor, got {x.dtype}")
    check_same(_OP, "x", x, {"weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B})
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"deltakern.{_OP}: x has {x.shape[-1]} input features, weight [out, in] expects in={in_features}")
    check_low_rank_factors(_OP, in_features, out_features, bias, lora_A, lora_B)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """LoRA linear layer ``y = x Wᵀ + b + scaling · (drop(x) Aᵀ) Bᵀ`` as one fused op.

    Args:
        x: ``[..., in]`` input.
        weight: ``[out, in]`` base weight, usually frozen (its gradient is computed only when it
            requires grad).
        bias: ``[out]`` base bias or None.
        lora_A: ``[r, in]`` down projection (r >= 1).
        lora_B: ``[out, r]`` up projection.
        scaling: the LoRA scale, ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1).
        seed: Philox seed of the dropout mask, an int in [0, 2**63); None draws one from torch's
            default generator (as a tensor, so torch.compile keeps it in the graph). Every
            backend draws the same mask for the same seed.

    Returns:
        ``[..., out]`` in x's dtype.

    Raises:
        ValueError: a shape, dtype, device or argument is wrong (the message names it).
        BackendUnavailableError: a forced backend cannot run this call.
    """
    _check_inputs(x, weight, bias, lora_A, lora_B)
    scaling = check_finite(_OP, "scaling", scaling)
    dropout_p = check_probability(_OP, "dropout_p", dropout_p)
    backend = select_backend(_OP, x.device.type, x.dtype)
    check_backend_dtype(_OP, backend, x.dtype)
    x2d = as_rows(x)
    if seed is not None:
        check_seed(_OP, seed)
    if backend == "reference":
        if seed is None:
            seed = int(draw_seed()) if dropout_p > 0.0 else 0
        out2d = reference.lora_linear(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    else:
        out2d, _ = _FWD_OPS[backend](x2d, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                     seed_tensor(seed, dropout_p))
    return out2d.reshape(*x.shape[:-1], weight.shape[0])
