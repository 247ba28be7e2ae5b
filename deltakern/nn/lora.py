"""``LoRALinear``: an existing ``nn.Linear`` (or transformers' ``Conv1D``) plus a low-rank update,
run by ``lora_linear``, or with ``use_dora`` by ``dora_linear`` (DoRA)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nf4 import quantize_nf4
from ..ops.dora_linear import RowSqNormCache, dora_linear
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

    With ``use_dora`` (DoRA, PEFT's ``use_dora=True``) the module computes, with the row norms
    ``n = ‖W + scaling · B A‖`` (a constant for autograd) and ``c = lora_magnitude / n``,
    ``y = c ⊙ (x Wᵀ + scaling · (x Aᵀ) Bᵀ) + b`` (without dropout) through ``dora_linear``;
    ``lora_magnitude`` starts at ``‖W‖`` per row, so the module again starts out equal to
    ``base``. ``‖W‖²`` of each row is cached between calls and recomputed when the base weight
    changes in place (version counter: optimizer steps, ``load_state_dict``, ``merge_lora``) or is
    replaced; a write through ``weight.data`` bypasses the version counter and is not seen. Over
    an ``NF4Linear`` base (QDoRA) the weight is dequantised to the compute dtype on every forward
    and the dense ``dora_linear`` runs on it (as PEFT dequantises bitsandbytes' 4-bit weight each
    forward for DoRA): this path is not fused yet, and holds one ``[out, in]`` weight per call.

    A ``Conv1D`` base keeps its ``[in, out]`` weight; the forward hands ``lora_linear`` (and
    ``dora_linear``) the transposed view ``weight.t()``. The CPU and CUDA backends give that view
    to the GEMMs as a transposed operand (no copy); the Triton backend makes the weight contiguous,
    i.e. copies a ``Conv1D`` weight once per forward and once per backward.

    Attributes:
        base_layer: the wrapped ``nn.Linear`` (weight ``[out, in]``) or ``Conv1D`` (weight
            ``[in, out]``), frozen by the caller.
        fan_in_fan_out: True for a ``Conv1D`` base (PEFT's name for a weight stored ``[in, out]``).
        lora_A: ``[r, in]`` parameter.
        lora_B: ``[out, r]`` parameter.
        use_dora: whether the module is DoRA.
        lora_magnitude: ``[out]`` parameter (DoRA's magnitude vector, PEFT's
            ``lora_magnitude_vector``), in lora_A's dtype and on its device; None without DoRA.

    Shapes: input ``[..., in]``, output ``[..., out]``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout_p: float = 0.0, use_rslora: bool = False,
                 use_dora: bool = False):
        super().__init__(base, "deltakern.nn.LoRALinear", nf4=True)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"deltakern.nn.LoRALinear: r must be an int >= 1, got {r!r}")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"deltakern.nn.LoRALinear: dropout_p must be in [0, 1), got {dropout_p!r}")
        if not isinstance(use_dora, bool):
            raise ValueError(f"deltakern.nn.LoRALinear: use_dora must be a bool, got {use_dora!r}")
        self.r = r
        self.alpha = alpha
        self.dropout_p = float(dropout_p)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.use_dora = use_dora
        dtype = base.compute_dtype if self.nf4_base else base.weight.dtype
        factory = {"device": base.weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        if use_dora:
            self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, **factory))
            self._weight_sqnorm = RowSqNormCache()
        else:
            self.register_parameter("lora_magnitude", None)
        self.reset_lora_parameters()

    def delta_parameters(self):
        return iter((self.lora_A, self.lora_B) + ((self.lora_magnitude,) if self.use_dora else ()))

    def reset_lora_parameters(self) -> None:
        """PEFT's initialisation: A kaiming-uniform, B zeros and, with DoRA, the magnitude
        ``‖W + scaling · B A‖ = ‖W‖`` of each row."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.use_dora:
            with torch.no_grad():
                self.lora_magnitude.copy_(torch.linalg.vector_norm(self._dense_weight(), dim=1))

    def _dense_weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]``: a view (transposed for a ``Conv1D``), or for an NF4
        base the weight dequantised to its compute dtype."""
        if self.nf4_base:
            return self.base_layer.dequantized()
        return self.base_layer.weight.t() if self.fan_in_fan_out else self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout_p if self.training else 0.0
        if self.use_dora:
            weight = self._dense_weight()
            # A dequantised NF4 weight is a new tensor each call: nothing to cache it by.
            sqnorm = None if self.nf4_base else self._weight_sqnorm(weight)
            return dora_linear(x, weight, self.base_layer.bias, self.lora_A, self.lora_B, self.lora_magnitude,
                               self.scaling, p, weight_sqnorm=sqnorm)
        if self.nf4_base:
            return qlora_linear(x, self.base_layer.nf4_weight(), self.base_layer.bias, self.lora_A, self.lora_B,
                                self.scaling, p)
        return lora_linear(x, self._dense_weight(), self.base_layer.bias, self.lora_A, self.lora_B, self.scaling, p)

    def _merged_weight(self, dense: torch.Tensor) -> torch.Tensor:
        """``W + scaling · B A`` for the ``[out, in]`` weight ``dense``, folded with DoRA's scale
        ``lora_magnitude / ‖W + scaling · B A‖`` (per row) when ``use_dora``; in dense's dtype."""
        merged = dense + self.scaling * (self.lora_B.to(dense.dtype) @ self.lora_A.to(dense.dtype))
        if self.use_dora:
            norm = torch.linalg.vector_norm(merged, dim=1)
            merged = merged * (self.lora_magnitude.to(dense.dtype) / norm).unsqueeze(1)
        return merged

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with the update folded into its weight (transposed for a ``Conv1D``),
        so it alone computes what this module computes without dropout: ``W ← W + scaling · B A``,
        with DoRA ``W ← (m / n) ⊙ (W + scaling · B A)`` (m the magnitude, n the row norms of the
        sum; PEFT's merge). A dense base is changed in place; a bf16/fp16 weight is merged in fp32
        and rounded once.

        An ``NF4Linear`` base is dequantised (fp32), merged and quantised again with its block
        size and nesting, as PEFT merges into a bitsandbytes 4-bit layer: a new ``NF4Linear``
        whose weight carries a second NF4 rounding, so it matches the LoRA model only to NF4's
        precision."""
        base = self.base_layer
        if self.nf4_base:
            merged = self._merged_weight(base.dequantized(torch.float32))
            weight = quantize_nf4(merged.to(base.compute_dtype), base.blocksize, base.nested)
            return NF4Linear(weight, base.bias).to(base.weight.device)
        dense = self._dense_weight()
        acc = torch.float64 if dense.dtype == torch.float64 else torch.float32
        dense.copy_(self._merged_weight(dense.to(acc)))
        return base

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, dropout_p={self.dropout_p:g}, use_dora={self.use_dora}"
        )
