"""``IA3Linear``: an existing ``nn.Linear`` (or transformers' ``Conv1D``) with a learned (IA)³
scaling vector (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning")."""

from __future__ import annotations

import torch
from torch import nn

from .wrapped_linear import WrappedLinear


class IA3Linear(WrappedLinear):
    """Wraps ``base`` (an ``nn.Linear`` or transformers' ``Conv1D``) and rescales it elementwise
    with the trainable vector ``ia3_l``, as PEFT's IA3 layers do:

    - ``feedforward=False`` (keys, values): ``y = base(x) * ia3_l``, ``ia3_l`` of shape ``[out]``;
      the base bias is scaled too.
    - ``feedforward=True`` (the FFN's down projection): ``y = base(x * ia3_l)``, ``ia3_l`` of shape
      ``[in]``, i.e. the FFN intermediate activations are rescaled before the projection.

    ``ia3_l`` starts at ones, so the module starts out equal to ``base``.

    This is the reference path in plain torch: the product is a separate elementwise pass over the
    output (or input) of the projection. The fused epilogue (the scale applied inside the
    projection's kernel) is not written yet.

    The product is computed in ``ia3_l``'s dtype and cast back to the dtype of the tensor it
    scales, as PEFT does, so an fp32 vector on a bf16 model keeps the model's dtype.

    Attributes:
        base_layer: the wrapped ``nn.Linear`` (weight ``[out, in]``) or ``Conv1D`` (weight
            ``[in, out]``), frozen by the caller.
        feedforward: where the vector applies (see above).
        fan_in_fan_out: True for a ``Conv1D`` base.
        ia3_l: ``[out]`` (``feedforward=False``) or ``[in]`` (``feedforward=True``) parameter.

    Shapes: input ``[..., in]``, output ``[..., out]``.
    """

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__(base, "deltakern.nn.IA3Linear")
        if not isinstance(feedforward, bool):
            raise ValueError(f"deltakern.nn.IA3Linear: feedforward must be a bool, got {feedforward!r}")
        self.feedforward = feedforward
        size = self.in_features if feedforward else self.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, device=base.weight.device, dtype=base.weight.dtype))

    def reset_ia3_parameters(self) -> None:
        nn.init.ones_(self.ia3_l)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return self.base_layer((x.to(self.ia3_l.dtype) * self.ia3_l).to(x.dtype))
        y = self.base_layer(x)
        return (y * self.ia3_l).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, feedforward={self.feedforward}"
