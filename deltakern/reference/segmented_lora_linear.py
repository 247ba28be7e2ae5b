"""Pure-PyTorch ground truth of ``segmented_lora_linear``: one ``lora_linear`` per adapter on its
own rows; autograd gives the backward."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .lora_linear import dropout


def segmented_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scalings: Sequence[float],
    adapter_index: torch.Tensor,
    dropout_p: Sequence[float],
    seeds: Sequence[int],
) -> torch.Tensor:
    """``y[m] = x[m] Wᵀ + b + s_a · (drop_a(x[m]) A_aᵀ) B_aᵀ`` with ``a = adapter_index[m]``.

    x ``[M, in]``; weight ``[out, in]``; bias ``[out]`` or None; adapter i has lora_A[i]
    ``[r_i, in]``, lora_B[i] ``[out, r_i]``, scaling ``scalings[i]`` and dropout ``dropout_p[i]``;
    adapter_index ``[M]`` integers in ``[-1, n)`` (-1: the base only). Adapter i's rows, in
    ascending order, drop as ``lora_linear`` drops them as one ``[M_i, in]`` input with seed
    ``seeds[i]``. Returns ``[M, out]``.
    """
    out = F.linear(x, weight, bias)
    for i, (a, b) in enumerate(zip(lora_A, lora_B)):
        # An adapter without rows still runs on its empty rows: autograd then gives it zero
        # gradients, as every backend does, instead of none.
        rows = (adapter_index == i).nonzero().squeeze(1)
        x_i = dropout(x.index_select(0, rows), dropout_p[i], seeds[i])
        out = out.index_add(0, rows, scalings[i] * F.linear(F.linear(x_i, a), b))
    return out
