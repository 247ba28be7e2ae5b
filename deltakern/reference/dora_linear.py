"""Pure-PyTorch ground truth of ``dora_linear`` (DoRA), written as PEFT's ``DoraLinearLayer``
computes it: the dense ``W + s·B A``, its row norms (detached), then the magnitude scale;
autograd gives its backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora_linear import dropout


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖W + scaling · B A‖₂`` of each row, ``[out]``, detached, in weight's dtype: PEFT's
    direct form, through the dense ``[out, in]`` sum."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """DoRA for x ``[..., in]``; returns ``[..., out]``.

    weight ``[out, in]``, bias ``[out]`` or None, lora_A ``[r, in]``, lora_B ``[out, r]``,
    magnitude ``[out]``. With ``n = ‖W + s B A‖`` per row (a constant for autograd) and
    ``c = magnitude / n``:

    - ``dropout_p == 0``: ``y = c ⊙ (x Wᵀ + s · (x Aᵀ) Bᵀ) + b``;
    - ``dropout_p > 0``: ``y = x Wᵀ + b + (c − 1) ⊙ (x̃ Wᵀ) + c ⊙ s · (x̃ Aᵀ) Bᵀ`` with
      ``x̃ = drop(x)``, deltakern's Philox mask of ``seed`` (PEFT's dropout branch, which applies
      the magnitude correction to the dropped input).
    """
    x2d = x.reshape(x.shape[:-1].numel(), x.shape[-1])  # -1 is ambiguous when in = 0
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    scale = magnitude / norm
    if dropout_p == 0.0:
        out = scale * (F.linear(x2d, weight) + scaling * F.linear(F.linear(x2d, lora_A), lora_B))
        if bias is not None:
            out = out + bias
    else:
        x_dropped = dropout(x2d, dropout_p, seed)
        out = (F.linear(x2d, weight, bias) + (scale - 1) * F.linear(x_dropped, weight)
               + scale * scaling * F.linear(F.linear(x_dropped, lora_A), lora_B))
    return out.reshape(*x.shape[:-1], weight.shape[0])
