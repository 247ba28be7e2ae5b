"""Pure-PyTorch ground truth of ``adapter``; autograd gives its backward.

Written as adapter libraries run a bottleneck adapter: a Linear down, the activation, a Linear
up, a scale and the residual add, each its own eager op. Every kernel is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import activation_fn


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
    """``residual + scaling · (act(h w_downᵀ + b_down) w_upᵀ + b_up)``.

    Shapes: h ``[..., d]``, w_down ``[r, d]``, b_down ``[r]`` or None, w_up ``[d, r]``, b_up
    ``[d]`` or None, residual ``[..., d]`` like h (None: h itself); returns ``[..., d]``.
    Computed in the inputs' dtype, without upcasting.
    """
    z = F.linear(h, w_down, b_down)
    up = F.linear(activation_fn(activation)(z), w_up, b_up)
    return (h if residual is None else residual) + scaling * up
