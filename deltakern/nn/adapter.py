"""``Adapter``: a bottleneck adapter (Houlsby et al.) running through the fused ``adapter`` op."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..activations import check_activation
from ..ops.adapter import adapter
from .delta import DeltaModule

INITS = ("houlsby", "lora")
# Houlsby et al. draw both projections near zero so that a freshly inserted adapter is nearly
# the identity (its output is the residual plus a small perturbation).
HOULSBY_STD = 1e-2


class Adapter(DeltaModule):
    """``out = residual + scaling · up(act(down(h)))`` with ``down: d_model → bottleneck`` and
    ``up: bottleneck → d_model`` as ``nn.Linear`` layers (weights ``[r, d]`` and ``[d, r]``).

    ``forward(h, residual=None)`` takes h ``[..., d_model]`` and an optional residual of h's shape
    (None adds h itself: the adapter is applied to a sublayer's output before the residual add);
    it returns ``[..., d_model]``.

    Init ``"houlsby"``: both weights normal with std 1e-2, biases zero, so the module starts
    near the identity. Init ``"lora"``: ``down`` kaiming-uniform (as LoRA's A), ``up`` all zeros,
    so the module returns exactly its residual at init.
    """

    def __init__(self, d_model: int, bottleneck: int, activation: str = "relu", scaling: float = 1.0,
                 init: str = "houlsby"):
        super().__init__()
        for name, value in (("d_model", d_model), ("bottleneck", bottleneck)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"deltakern.nn.Adapter: {name} must be an int >= 1, got {value!r}")
        check_activation("deltakern.nn.Adapter", activation)
        if init not in INITS:
            raise ValueError(f"deltakern.nn.Adapter: unknown init {init!r}; expected one of {', '.join(INITS)}")
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise ValueError(f"deltakern.nn.Adapter: scaling must be a finite number, got {scaling!r}")
        self.d_model, self.bottleneck = d_model, bottleneck
        self.activation, self.scaling, self.init = activation, float(scaling), init
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "houlsby":
            nn.init.normal_(self.down.weight, std=HOULSBY_STD)
            nn.init.normal_(self.up.weight, std=HOULSBY_STD)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return adapter(h, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                       activation=self.activation, scaling=self.scaling, residual=residual)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, "
                f"scaling={self.scaling:g}, init={self.init!r}")
