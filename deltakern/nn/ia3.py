"""``IA3Linear``: an existing ``nn.Linear`` (or transformers' ``Conv1D``) with a learned (IA)³
scaling vector (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning")."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.ia3_linear import ia3_linear
from .wrapped_linear import WrappedLinear


class IA3Linear(WrappedLinear):
    """Wraps ``base`` (an ``nn.Linear`` or transformers' ``Conv1D``) and rescales it elementwise
    with the trainable vector ``ia3_l``, as PEFT's IA3 layers do:

    - ``feedforward=False`` (keys, values): ``y = base(x) * ia3_l``, ``ia3_l`` of shape ``[out]``;
      the base bias is scaled too.
    - ``feedforward=True`` (the FFN's down projection): ``y = base(x * ia3_l)``, ``ia3_l`` of shape
      ``[in]``, i.e. the FFN intermediate activations are rescaled before the projection.

    ``ia3_l`` starts at ones, so the module starts out equal to ``base``.

    The forward is one ``deltakern.ia3_linear`` call: the scale is applied inside the projection's
    kernel, not as a separate pass over its output or input. A ``Conv1D`` weight is handed over
    as the transposed view ``weight.t()``, which the op makes contiguous (a copy per call).

    ``ia3_l`` is cast to the input's dtype for the op (an fp32 vector on a bf16 model scales in
    bf16 values; PEFT multiplies in the vector's dtype and casts the product back); products are
    accumulated in fp32 either way.

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

    def delta_parameters(self):
        return iter((self.ia3_l,))

    def reset_ia3_parameters(self) -> None:
        nn.init.ones_(self.ia3_l)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.weight.t() if self.fan_in_fan_out else self.base_layer.weight
        return ia3_linear(x, weight, self.base_layer.bias, self.ia3_l.to(x.dtype), scale_input=self.feedforward)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, feedforward={self.feedforward}"
