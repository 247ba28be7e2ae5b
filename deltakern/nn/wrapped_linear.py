"""``WrappedLinear``: what the delta modules that wrap a linear layer share: the base layer, its
geometry for an ``nn.Linear`` or transformers' ``Conv1D``, and the base's ``weight`` and ``bias``
exposed as the wrapper's own."""

from __future__ import annotations

import torch
from torch import nn

from .delta import DeltaModule


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer, weight ``[in, out]``).
    transformers is optional: without it no module is a ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


class WrappedLinear(DeltaModule):
    """Holds ``base`` (an ``nn.Linear``, weight ``[out, in]``, or a ``Conv1D``, weight ``[in, out]``)
    as ``base_layer``; ``fan_in_fan_out`` is True for a ``Conv1D`` (PEFT's name for that layout).

    ``owner`` names the subclass in the error raised for any other base; ``nf4`` also admits an
    ``NF4Linear`` (a 4-bit base, for the subclasses that run it; ``nf4_base`` says which). A subclass's
    ``delta_parameters`` are its own, never the base layer's.
    """

    def __init__(self, base: nn.Module, owner: str, nf4: bool = False):
        super().__init__()
        from .nf4_linear import NF4Linear

        self.fan_in_fan_out = is_conv1d(base)
        self.nf4_base = nf4 and isinstance(base, NF4Linear)
        if not (isinstance(base, nn.Linear) or self.fan_in_fan_out or self.nf4_base):
            kinds = "an nn.Linear, transformers' Conv1D" + (" or an NF4Linear" if nf4 else "")
            raise ValueError(f"{owner}: base must be {kinds}, got {type(base).__name__}")
        self.base_layer = base

    @property
    def in_features(self) -> int:
        if self.nf4_base:  # its weight holds packed codes
            return self.base_layer.in_features
        return self.base_layer.weight.shape[0 if self.fan_in_fan_out else 1]

    @property
    def out_features(self) -> int:
        if self.nf4_base:
            return self.base_layer.out_features
        return self.base_layer.weight.shape[1 if self.fan_in_fan_out else 0]

    # Model code reads a linear layer's weight and bias directly (T5 checks ``wo.weight.dtype``);
    # like PEFT's layers, expose the base layer's (plain properties: not registered twice).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias
