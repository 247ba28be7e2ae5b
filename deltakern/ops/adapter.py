"""``adapter``: checks, backend dispatch, torch.library registration and autograd.

The C++ op ``torch.ops.deltakern.adapter_fwd`` (CPU and CUDA kernels from ``deltakern._C``) and
the Triton op ``deltakern::adapter_fwd_triton`` share one autograd formula, registered with
``torch.library.register_autograd``; both have fake kernels, so ``torch.compile`` traces them
without a graph break. Backward saves h (the caller's tensor, not a copy), the ``[M, r]``
pre-activation and the weights by reference; the activation is recomputed from the
pre-activation.
"""

from __future__ import annotations

import torch

from ..activations import CODES, check_activation
from ..backend import BACKENDS, select_backend
from ..reference import adapter as reference
from ..registry import OpSpec, register_op
from ._common import as_rows, check_backend_dtype, check_finite, check_same, check_tensor, register_backends

_OP = "adapter"


@torch.library.custom_op("deltakern::adapter_fwd_triton", mutates_args=())
def _triton_fwd(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton_kernels.adapter import adapter_fwd

    return adapter_fwd(h, w_down, b_down, w_up, b_up, residual, activation, scaling)


@torch.library.custom_op("deltakern::adapter_bwd_triton", mutates_args=())
def _triton_bwd(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    pre: torch.Tensor,
    activation: int,
    scaling: float,
    residual_is_h: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton_kernels.adapter import adapter_bwd

    return adapter_bwd(grad_out, h, w_down, w_up, pre, activation, scaling, residual_is_h)


def _fwd_fake(h, w_down, b_down, w_up, b_up, residual, activation, scaling):
    return torch.empty_like(h), h.new_empty(h.shape[0], w_down.shape[0])


def _bwd_fake(grad_out, h, w_down, w_up, pre, activation, scaling, residual_is_h):
    return (torch.empty_like(h), torch.empty_like(w_down), w_down.new_empty(w_down.shape[0]),
            torch.empty_like(w_up), w_up.new_empty(w_up.shape[0]))


def _setup_context(ctx, inputs, output):
    h, w_down, b_down, w_up, b_up, residual, activation, scaling = inputs
    _, pre = output
    ctx.mark_non_differentiable(pre)
    ctx.save_for_backward(h, w_down, w_up, pre)
    ctx.activation, ctx.scaling = activation, scaling
    ctx.residual_is_h = residual is None
    ctx.has_bias = (b_down is not None, b_up is not None)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, _grad_pre):
        h, w_down, w_up, pre = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dh, dw_down, db_down, dw_up, db_up = bwd_op(
            grad_out, h, w_down, w_up, pre, ctx.activation, ctx.scaling, ctx.residual_is_h)
        has_b_down, has_b_up = ctx.has_bias
        # A separate residual enters the output with weight 1: its gradient is dOut itself.
        d_residual = None if ctx.residual_is_h else grad_out
        return (dh, dw_down, db_down if has_b_down else None, dw_up, db_up if has_b_up else None,
                d_residual, None, None)

    return backward


_FWD_OPS = register_backends(_OP, _triton_fwd, _triton_bwd, _fwd_fake, _bwd_fake, _make_backward, _setup_context)
SPEC = register_op(OpSpec(name=_OP, cli_name="adapter", reference=reference.adapter, backends=BACKENDS,
                           cuda_tensor_cores="cuBLAS"))


def _check_inputs(h, w_down, b_down, w_up, b_up, residual) -> None:
    check_tensor(_OP, "h", h)
    if h.dim() < 1:
        raise ValueError(f"deltakern.{_OP}: h must have shape [..., d], got a 0-D tensor")
    if not h.dtype.is_floating_point:
        raise ValueError(f"deltakern.{_OP}: h must be a floating-point tensor, got {h.dtype}")
    check_tensor(_OP, "w_down", w_down, 2)
    check_tensor(_OP, "w_up", w_up, 2)
    for name, t in (("b_down", b_down), ("b_up", b_up)):
        if t is not None:
            check_tensor(_OP, name, t, 1)
    if residual is not None:
        check_tensor(_OP, "residual", residual)
    check_same(_OP, "h", h, {"w_down": w_down, "b_down": b_down, "w_up": w_up, "b_up": b_up, "residual": residual})
    d = h.shape[-1]
    r = w_down.shape[0]
    if w_down.shape[1] != d:
        raise ValueError(f"deltakern.{_OP}: w_down must be [r, d={d}] for h [..., d={d}], got {tuple(w_down.shape)}")
    if r == 0:
        raise ValueError(f"deltakern.{_OP}: w_down has r=0 rows; the bottleneck must be at least 1")
    if tuple(w_up.shape) != (d, r):
        raise ValueError(f"deltakern.{_OP}: w_up must be [d={d}, r={r}], got {tuple(w_up.shape)}")
    if b_down is not None and b_down.shape[0] != r:
        raise ValueError(f"deltakern.{_OP}: b_down must be [r={r}], got {tuple(b_down.shape)}")
    if b_up is not None and b_up.shape[0] != d:
        raise ValueError(f"deltakern.{_OP}: b_up must be [d={d}], got {tuple(b_up.shape)}")
    if residual is not None and residual.shape != h.shape:
        raise ValueError(f"deltakern.{_OP}: residual must have h's shape {tuple(h.shape)}, got {tuple(residual.shape)}")


def adapter(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    *,
    activation: str = "relu",
    scaling: float = 1.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bottleneck adapter ``residual + scaling · (act(h w_downᵀ + b_down) w_upᵀ + b_up)`` as one fused op.

    Args:
        h: ``[..., d]`` hidden states (the adapter's input).
        w_down: ``[r, d]`` down projection (r is the bottleneck, r >= 1).
        b_down: ``[r]`` or None.
        w_up: ``[d, r]`` up projection.
        b_up: ``[d]`` or None.
        activation: one of ``"relu"``, ``"gelu"`` (exact, erf), ``"gelu_tanh"`` (tanh
            approximation), ``"silu"``, ``"tanh"``.
        scaling: the factor on the adapter's output.
        residual: ``[..., d]`` like h, added to the output; None adds h itself.

    Returns:
        ``[..., d]`` in h's dtype. Gradients flow to h, w_down, b_down, w_up, b_up and residual.

    Raises:
        ValueError: a shape, dtype, device or argument is wrong (the message names it).
        BackendUnavailableError: a forced backend cannot run this call.
    """
    _check_inputs(h, w_down, b_down, w_up, b_up, residual)
    check_activation(f"deltakern.{_OP}", activation)
    scaling = check_finite(_OP, "scaling", scaling)
    backend = select_backend(_OP, h.device.type, h.dtype)
    check_backend_dtype(_OP, backend, h.dtype)
    if backend == "reference":
        return reference.adapter(h, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling, residual=residual)
    h2d = as_rows(h).contiguous()
    residual2d = None if residual is None else as_rows(residual).contiguous()
    b_down, b_up = (None if b is None else b.contiguous() for b in (b_down, b_up))
    out2d, _ = _FWD_OPS[backend](h2d, w_down.contiguous(), b_down, w_up.contiguous(), b_up, residual2d,
                                 CODES[activation], scaling)
    return out2d.reshape(h.shape)
