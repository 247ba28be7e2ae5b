"""``qlora_linear``: LoRA over a 4-bit NF4 base weight (QLoRA), with checks, backend dispatch,
torch.library registration and autograd.

The NF4 weight is dequantised tile by tile inside the base GEMMs of every backend (forward
``x Ŵᵀ``, backward ``dY Ŵ``); no backend writes the dense ``[out, in]`` weight. The low-rank
branch, its dropout mask (regenerated from the seed) and what backward saves are those of
``lora_linear``: x by reference, xa ``[M, r]``, the packed weight and its fp32 block scales.
"""

from __future__ import annotations

import torch

from ..backend import BACKENDS, select_backend
from ..nf4 import NF4_CODE, NF4Weight
from ..reference import qlora_linear as reference
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

_OP = "qlora_linear"


@torch.library.custom_op("deltakern::qlora_linear_fwd_triton", mutates_args=())
def _triton_fwd(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    out_features: int,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton_kernels.qlora_linear import qlora_linear_fwd

    return qlora_linear_fwd(x, packed, absmax, code, blocksize, out_features, bias, lora_A, lora_B, scaling,
                            dropout_p, int(seed.item()))


@torch.library.custom_op("deltakern::qlora_linear_bwd_triton", mutates_args=())
def _triton_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton_kernels.qlora_linear import qlora_linear_bwd

    return qlora_linear_bwd(grad_out, x, packed, absmax, code, blocksize, lora_A, lora_B, xa, scaling, dropout_p,
                            int(seed.item()))


def _fwd_fake(x, packed, absmax, code, blocksize, out_features, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], out_features), x.new_empty(x.shape[0], lora_A.shape[0])


def _bwd_fake(grad_out, x, packed, absmax, code, blocksize, lora_A, lora_B, xa, scaling, dropout_p, seed):
    return torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, packed, absmax, code, blocksize, _, _, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, packed, absmax, code, lora_A, lora_B, xa, seed)
    ctx.blocksize, ctx.scaling, ctx.dropout_p = blocksize, scaling, dropout_p


def _make_backward(bwd_op):
    def backward(ctx, grad_out, _grad_xa):
        x, packed, absmax, code, lora_A, lora_B, xa, seed = ctx.saved_tensors
        dx, d_lora_A, d_lora_B = bwd_op(grad_out, x, packed, absmax, code, ctx.blocksize, lora_A, lora_B, xa,
                                        ctx.scaling, ctx.dropout_p, seed)
        d_bias = grad_out.sum(0) if ctx.needs_input_grad[6] else None
        return dx, None, None, None, None, None, d_bias, d_lora_A, d_lora_B, None, None, None

    return backward


_FWD_OPS = register_backends(_OP, _triton_fwd, _triton_bwd, _fwd_fake, _bwd_fake, _make_backward, _setup_context)
SPEC = register_op(OpSpec(name=_OP, cli_name="qlora", reference=reference.qlora_linear, backends=BACKENDS,
                           cuda_tensor_cores="cuBLAS"))


_CODES: dict[torch.device, torch.Tensor] = {}


def _code_on(device: torch.device) -> torch.Tensor:
    """The NF4 code table on ``device``, copied there once (the kernels read it as a tensor, so
    the 16 values live in one place, deltakern.nf4)."""
    code = _CODES.get(device)
    if code is None:
        code = _CODES[device] = NF4_CODE.to(device)
    return code


def as_nf4_weight(weight) -> NF4Weight:
    """``weight`` as an :class:`~deltakern.nf4.NF4Weight`: one already, or a bitsandbytes
    ``Params4bit`` (read in place). Anything else raises a ValueError naming what came."""
    if isinstance(weight, NF4Weight):
        return weight
    if hasattr(weight, "quant_state") or type(weight).__name__ == "Params4bit":
        return NF4Weight.from_bnb(weight)
    kind = f"a dense {weight.dtype} tensor" if isinstance(weight, torch.Tensor) else type(weight).__name__
    raise ValueError(
        f"deltakern.{_OP}: weight must be an NF4 weight (deltakern.nf4.NF4Weight or a bitsandbytes Params4bit), "
        f"got {kind}; use deltakern.lora_linear for dense weights or deltakern.nf4.quantize_nf4 to quantise one"
    )


def _check_inputs(x, weight: NF4Weight, bias, lora_A, lora_B) -> None:
    check_tensor(_OP, "x", x)
    if x.dim() < 1:
        raise ValueError(f"deltakern.{_OP}: x must have shape [..., in], got a 0-D tensor")
    check_tensor(_OP, "lora_A", lora_A, 2)
    check_tensor(_OP, "lora_B", lora_B, 2)
    if bias is not None:
        check_tensor(_OP, "bias", bias, 1)
    if not x.dtype.is_floating_point:
        raise ValueError(f"deltakern.{_OP}: x must be a floating-point tensor, got {x.dtype}")
    check_same(_OP, "x", x, {"bias": bias, "lora_A": lora_A, "lora_B": lora_B})
    if weight.device != x.device:
        raise ValueError(f"deltakern.{_OP}: the NF4 weight is on {weight.device}, expected {x.device} like x")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"deltakern.{_OP}: x has {x.shape[-1]} input features, weight [out, in] expects in={in_features}")
    check_low_rank_factors(_OP, in_features, out_features, bias, lora_A, lora_B)


def qlora_linear(
    x: torch.Tensor,
    weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """QLoRA linear layer ``y = x Ŵᵀ + b + scaling · (drop(x) Aᵀ) Bᵀ`` with Ŵ an NF4 weight.

    Args:
        x: ``[..., in]`` input (the compute dtype: Ŵ is dequantised to it, as bitsandbytes does).
        weight: the frozen ``[out, in]`` base weight in NF4: a :class:`deltakern.nf4.NF4Weight`
            (:func:`deltakern.nf4.quantize_nf4` makes one) or a bitsandbytes ``Params4bit``
            (``Linear4bit.weight``), read in place. It gets no gradient.
        bias: ``[out]`` base bias or None.
        lora_A: ``[r, in]`` down projection (r >= 1).
        lora_B: ``[out, r]`` up projection.
        scaling: the LoRA scale, ``alpha / r``.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1).
        seed: Philox seed of the dropout mask, as in :func:`deltakern.lora_linear` (same mask).

    Returns:
        ``[..., out]`` in x's dtype.

    Raises:
        ValueError: the weight is not NF4, or a shape, dtype, device or argument is wrong.
        BackendUnavailableError: a forced backend cannot run this call.
    """
    weight = as_nf4_weight(weight)
    _check_inputs(x, weight, bias, lora_A, lora_B)
    scaling = check_finite(_OP, "scaling", scaling)
    dropout_p = check_probability(_OP, "dropout_p", dropout_p)
    backend = select_backend(_OP, x.device.type, x.dtype)
    check_backend_dtype(_OP, backend, x.dtype)
    if seed is not None:
        check_seed(_OP, seed)
    out_features = weight.shape[0]
    if backend == "reference":
        if seed is None:
            seed = int(draw_seed()) if dropout_p > 0.0 else 0
        return reference.qlora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    out2d, _ = _FWD_OPS[backend](as_rows(x), weight.packed, weight.absmax_fp32(), _code_on(x.device), weight.blocksize,
                                 out_features, bias, lora_A, lora_B, scaling, dropout_p,
                                 seed_tensor(seed, dropout_p))
    return out2d.reshape(*x.shape[:-1], out_features)
