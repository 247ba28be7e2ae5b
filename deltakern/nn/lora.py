"""``LoRALinear``: an existing ``nn.Linear`` plus a low-rank update, run by ``lora_linear``."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.lora_linear import lora_linear


class LoRALinear(nn.Module):
    """Wraps ``base`` (an ``nn.Linear``) as ``y = base(x) + scaling · B(A(drop(x)))``.

    Initialised as PEFT does: ``lora_A`` kaiming-uniform (a = √5), ``lora_B`` zeros, so the
    module starts out equal to ``base``. ``scaling = alpha / r``, or ``alpha / √r`` with
    ``use_rslora``. Dropout is active in training mode only; each call draws a fresh seed from
    torch's default generator.

    Attributes:
        base_layer: the wrapped ``nn.Linear`` (weight ``[out, in]``, frozen by the caller).
        lora_A: ``[r, in]`` parameter.
        lora_B: ``[out, r]`` parameter.

    Shapes: input ``[..., in]``, output ``[..., out]``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"deltakern.nn.LoRALinear: base must be an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"deltakern.nn.LoRALinear: r must be an int >= 1, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"deltakern.nn.LoRALinear: dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base
        self.r = r
        self.alpha = alpha
        self.dropout = float(dropout)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, **factory))
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B, self.scaling, p)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, dropout={self.dropout:g}"
        )
