"""``ia3_linear``: checks, backend dispatch, torch.library registration and autograd.

The C++ op ``torch.ops.deltakern.ia3_linear_fwd`` (CPU and CUDA kernels from ``deltakern._C``)
and the Triton op ``deltakern::ia3_linear_fwd_triton`` share one autograd formula, registered
with ``torch.library.register_autograd``; both have fake kernels, so ``torch.compile`` traces
them without a graph break.

What backward saves, besides the weights by reference: for an input scale, x (the caller's
tensor, not a copy); for an output scale, the unscaled projection ``z = x Wᵀ + b`` ``[M, out]``,
which ``ds = Σ dY ⊙ z`` needs (PEFT's eager ``base(x) * l`` keeps the same tensor). Recomputing z
in the backward instead would save those ``M·out`` elements for one more GEMM of ``2·M·in·out``
flops per layer, as much as the forward GEMM itself, so the op keeps z. x is saved for an output
scale only when the weight requires grad (its gradient needs x).
"""

from __future__ import annotations

import torch

from ..backend import BACKENDS, select_backend
from ..reference import ia3_linear as reference
from ..registry import OpSpec, register_op
from ._common import as_rows, check_backend_dtype, check_same, check_tensor, register_backends

_OP = "ia3_linear"


@torch.library.custom_op("deltakern::ia3_linear_fwd_triton", mutates_args=())
def _triton_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    scale_input: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton_kernels.ia3_linear import ia3_linear_fwd

    return ia3_linear_fwd(x, weight, bias, scale, scale_input)


@torch.library.custom_op("deltakern::ia3_linear_bwd_triton", mutates_args=())
def _triton_bwd(
    grad_out: torch.Tensor,
    unscaled: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    scale_input: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton_kernels.ia3_linear import ia3_linear_bwd

    return ia3_linear_bwd(grad_out, unscaled, weight, scale, scale_input)


def _fwd_fake(x, weight, bias, scale, scale_input):
    out = x.new_empty(x.shape[0], weight.shape[0])
    return out, x.new_empty(0 if scale_input else x.shape[0], weight.shape[0])


def _bwd_fake(grad_out, unscaled, weight, scale, scale_input):
    return grad_out.new_empty(grad_out.shape[0], weight.shape[1]), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, scale_input = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    # z is an output only to be saved: no zero-filled [M, N] gradient for it in every backward.
    ctx.set_materialize_grads(False)
    ctx.scale_input = scale_input
    ctx.has_bias = bias is not None
    # x feeds the weight gradient, and for an input scale the scale's gradient as well.
    keep_x = scale_input or weight.requires_grad
    ctx.save_for_backward(x if keep_x else None, weight, scale, None if scale_input else z)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, _grad_z):
        x, weight, scale, z = ctx.saved_tensors
        if grad_out is None:  # only z reached the loss (gradcheck does that): no gradient at all
            return None, None, None, None, None
        grad_out = grad_out.contiguous()
        dx, d_scale = bwd_op(grad_out, x if ctx.scale_input else z, weight, scale, ctx.scale_input)
        d_weight = d_bias = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # dY at the unscaled projection: dY itself for an input scale, dY ⊙ s for an output one.
            grad_z = grad_out if ctx.scale_input else grad_out * scale
            if ctx.needs_input_grad[1]:
                d_weight = grad_z.t().mm(x * scale if ctx.scale_input else x)
            if ctx.needs_input_grad[2] and ctx.has_bias:
                d_bias = grad_z.sum(0)
        return dx, d_weight, d_bias, d_scale, None

    return backward


_FWD_OPS = register_backends(_OP, _triton_fwd, _triton_bwd, _fwd_fake, _bwd_fake, _make_backward, _setup_context)
SPEC = register_op(OpSpec(name=_OP, cli_name="ia3", reference=reference.ia3_linear, backends=BACKENDS,
                           cuda_tensor_cores="cuBLAS"))


def _check_inputs(x, weight, bias, scale, scale_input) -> None:
    check_tensor(_OP, "x", x)
    if x.dim() < 1:
        raise ValueError(f"deltakern.{_OP}: x must have shape [..., in], got a 0-D tensor")
    if not x.dtype.is_floating_point:
        raise ValueError(f"deltakern.{_OP}: x must be a floating-point tensor, got {x.dtype}")
    check_tensor(_OP, "weight", weight, 2)
    check_tensor(_OP, "scale", scale, 1)
    if bias is not None:
        check_tensor(_OP, "bias", bias, 1)
    if not isinstance(scale_input, bool):
        raise ValueError(f"deltakern.{_OP}: scale_input must be a bool, got {scale_input!r}")
    check_same(_OP, "x", x, {"weight": weight, "bias": bias, "scale": scale})
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"deltakern.{_OP}: x has {x.shape[-1]} input features, weight [out, in] expects in={in_features}")
    if bias is not None and bias.shape[0] != out_features:
        raise ValueError(f"deltakern.{_OP}: bias must be [out={out_features}], got {tuple(bias.shape)}")
    if scale_input and scale.shape[0] != in_features:
        raise ValueError(f"deltakern.{_OP}: an input scale must be [in={in_features}], got {tuple(scale.shape)}")
    if not scale_input and scale.shape[0] != out_features:
        raise ValueError(f"deltakern.{_OP}: an output scale must be [out={out_features}], got {tuple(scale.shape)}")


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    *,
    scale_input: bool = False,
) -> torch.Tensor:
    """(IA)³ linear layer: a linear projection rescaled by a learned vector, the scale applied
    inside the projection's kernel rather than as a pass of its own.

    - ``scale_input=False`` (keys and values): ``y = (x Wᵀ + b) ⊙ scale``, scale ``[out]``; the
      bias is scaled too, as in PEFT's IA3 layers.
    - ``scale_input=True`` (the FFN's down projection): ``y = (x ⊙ scale) Wᵀ + b``, scale ``[in]``.

    Args:
        x: ``[..., in]`` input.
        weight: ``[out, in]`` base weight, usually frozen (its gradient is computed only when it
            requires grad).
        bias: ``[out]`` base bias or None.
        scale: the (IA)³ vector, ``[out]`` or ``[in]`` (see above), in x's dtype.
        scale_input: whether the scale applies to the input (True) or the output (False).

    Returns:
        ``[..., out]`` in x's dtype. Gradients flow to x and scale, and to weight and bias when
        they require grad. Backward keeps x for an input scale and the unscaled projection
        ``[M, out]`` for an output scale (the tensor the scale multiplied).

    Raises:
        ValueError: a shape, dtype, device or argument is wrong (the message names it).
        BackendUnavailableError: a forced backend cannot run this call.
    """
    _check_inputs(x, weight, bias, scale, scale_input)
    backend = select_backend(_OP, x.device.type, x.dtype)
    check_backend_dtype(_OP, backend, x.dtype)
    if backend == "reference":
        return reference.ia3_linear(x, weight, bias, scale, scale_input)
    x2d = as_rows(x).contiguous()
    out2d, _ = _FWD_OPS[backend](x2d, weight.contiguous(), None if bias is None else bias.contiguous(),
                                 scale.contiguous(), scale_input)
    return out2d.reshape(*x.shape[:-1], weight.shape[0])
