"""Pure-PyTorch ground truth of ``lora_linear``; autograd gives its backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .philox import dropout_keep_mask


def dropout(x2d: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """deltakern's dropout of a 2-D ``[M, in]`` tensor: Philox mask of ``(seed, p)``, scaled by 1/(1-p)."""
    if p == 0.0:
        return x2d
    mask = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x2d.device)
    return x2d * mask / (1.0 - p)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """``x Wᵀ + b + scaling · (drop(x) Aᵀ) Bᵀ`` for x ``[..., in]``; returns ``[..., out]``.

    weight ``[out, in]``, bias ``[out]`` or None, lora_A ``[r, in]``, lora_B ``[out, r]``.
    The dropout mask is that of every deltakern backend for the same ``seed``.
    """
    x2d = x.reshape(x.shape[:-1].numel(), x.shape[-1])  # -1 is ambiguous when in = 0
    x_dropped = dropout(x2d, dropout_p, seed)
    out = F.linear(x2d, weight, bias) + scaling * F.linear(F.linear(x_dropped, lora_A), lora_B)
    return out.reshape(*x.shape[:-1], weight.shape[0])
