"""Pure-PyTorch ground truth of ``ia3_linear``; autograd gives its backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    scale_input: bool = False,
) -> torch.Tensor:
    """(IA)³ linear layer for x ``[..., in]``; returns ``[..., out]``.

    ``scale_input=False``: ``(x Wᵀ + b) ⊙ scale`` with scale ``[out]`` (keys and values; the bias
    is scaled too). ``scale_input=True``: ``(x ⊙ scale) Wᵀ + b`` with scale ``[in]`` (the FFN's
    down projection). weight ``[out, in]``, bias ``[out]`` or None.
    """
    if scale_input:
        return F.linear(x * scale, weight, bias)
    return F.linear(x, weight, bias) * scale
