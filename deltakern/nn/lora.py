"""``LoRALinear``: an existing ``nn.Linear`` (or transformers' ``Conv1D``) plus a low-rank update,
run by ``lora_linear``."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nf4 import quantize_nf4
from ..ops.lora_linear import lora_linear
from ..ops.qlora_linear import qlora_linear
from .nf4_linear import NF4Linear
from .wrapped_linear import WrappedLinear


class LoRALinear(WrappedLinear):
    """Wraps ``base`` (an ``nn.Linear``, transformers' ``Conv1D`` or an :class:`NF4Linear`) as
    ``y = base(x) + scaling · B(A(drop(x)))``; over an ``NF4Linear`` (QLoRA) the forward runs
    ``qlora_linear``, which dequantises the 4-bit weight tile by tile inside its GEMMs.

    Initialised as PEFT does: ``lora_A`` kaiming-uniform (a = √5), ``lora_B`` zeros, so the
    module starts out equal to ``base``. ``scaling = alpha / r``, or ``alpha / √r`` with
    ``use_rslora``. Dropout is active in training mode only; each call draws a fresh seed from
    torch's default generator.

    A ``Conv1D`` base keeps its ``[in, out]`` weight; the forward hands ``lora_linear`` the
    transposed view ``weight.t()``. The CPU and CUDA backends give that view to the GEMMs as a
    transposed operand (no copy); the Triton backend makes the weight contiguous, i.e. copies a
    ``Conv1D`` weight once per forward and once per backward.

    Attributes:
        base_layer: the wrapped ``nn.Linear`` (weight ``[out, in]``) or ``Conv1D`` (weight
            ``[in, out]``), frozen by the caller.
        fan_in_fan_out: True for a ``Conv1D`` base (PEFT's name for a weight stored ``[in, out]``).
        lora_A: ``[r, in]`` parameter.
        lora_B: ``[out, r]`` parameter.

    Shapes: input ``[..., in]``, output ``[..., out]``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout_p: float = 0.0, use_rslora: bool = False):
        super().__init__(base, "deltakern.nn.LoRALinear", nf4=True)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"deltakern.nn.LoRALinear: r must be an int >= 1, got {r!r}")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"deltakern.nn.LoRALinear: dropout_p must be in [0, 1), got {dropout_p!r}")
        self.r = r
        self.alpha = alpha
        self.dropout_p = float(dropout_p)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        dtype = base.compute_dtype if self.nf4_base else base.weight.dtype
        factory = {"device": base.weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters()

    def delta_parameters(self):
        return iter((self.lora_A, self.lora_B))

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout_p if self.training else 0.0
        if self.nf4_base:
            return qlora_linear(x, self.base_layer.nf4_weight(), self.base_layer.bias, self.lora_A, self.lora_B,
                                self.scaling, p)
        weight = self.base_layer.weight.t() if self.fan_in_fan_out else self.base_layer.weight
        return lora_linear(x, weight, self.base_layer.bias, self.lora_A, self.lora_B, self.scaling, p)

    def merged_base(self) -> nn.Module:
        """The base layer with ``scaling · B A`` added to its weight in place (transposed for a
        ``Conv1D``), so it alone computes what this module computes without dropout.

        An ``NF4Linear`` base is dequantised (fp32), merged and quantised again with its block
        size and nesting, as PEFT merges into a bitsandbytes 4-bit layer: a new ``NF4Linear``
        whose weight carries a second NF4 rounding, so it matches the LoRA model only to NF4's
        precision."""
        delta = self.scaling * (self.lora_B @ self.lora_A)
        base = self.base_layer
        if self.nf4_base:
            merged = base.dequantized(torch.float32) + delta.detach().float()
            weight = quantize_nf4(merged.to(base.compute_dtype), base.blocksize, base.nested)
            return NF4Linear(weight, base.bias).to(base.weight.device)
        with torch.no_grad():
            self.base_layer.weight.add_(delta.t() if self.fan_in_fan_out else delta)
        return self.base_layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, dropout_p={self.dropout_p:g}"
        )
