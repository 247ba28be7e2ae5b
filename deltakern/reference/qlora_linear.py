"""Pure-PyTorch ground truth of ``qlora_linear``: dequantise the NF4 weight to x's dtype (as
bitsandbytes does, bit for bit), then ``lora_linear``'s formula; autograd gives its backward."""

from __future__ import annotations

import torch

from ..nf4 import NF4Weight
from .lora_linear import lora_linear


def qlora_linear(
    x: torch.Tensor,
    weight: NF4Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """``x Ŵᵀ + b + scaling · (drop(x) Aᵀ) Bᵀ`` with Ŵ ``[out, in]`` the NF4 weight dequantised
    to x's dtype; x ``[..., in]``, returns ``[..., out]``. The weight gets no gradient."""
    return lora_linear(x, weight.dequantize(x.dtype), bias, lora_A, lora_B, scaling, dropout_p, seed)
