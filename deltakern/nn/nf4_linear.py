"""``NF4Linear``: a frozen linear layer whose weight is stored in 4-bit NF4 (bitsandbytes' format,
:mod:`deltakern.nf4`), the base layer of QLoRA."""

from __future__ import annotations

import torch
from torch import nn

from ..nf4 import NF4Weight, quantize_nf4
from .wrapped_linear import is_conv1d

_NESTED = ("offset", "nested_absmax", "nested_code")


class NF4Linear(nn.Module):
    """``y = x Ŵᵀ + b`` with Ŵ ``[out, in]`` held in NF4 and dequantised to x's dtype when used.

    The packed uint8 codes ``[ceil(out·in/2)]`` are a frozen ``nn.Parameter`` ``weight``, as
    bitsandbytes' ``Linear4bit.weight`` (a ``Params4bit``) holds them, so that FSDP2's
    ``fully_shard`` shards them with the other frozen weights; the block scales and nested state
    are buffers (``weight_absmax``; with nested quantisation ``weight_offset``,
    ``weight_nested_absmax``, ``weight_nested_code``), as bitsandbytes keeps them in the weight's
    quant state, replicated. ``state_dict``, ``.to(device)`` and ``load_state_dict`` carry them all.
    ``.to(dtype)`` changes the compute dtype and the bias, never the quantised bytes. The bias
    stays a frozen ``nn.Parameter``.

    On its own the layer dequantises the whole weight per call (as bitsandbytes does on the CPU);
    under a ``LoRALinear`` the fused QLoRA op dequantises it tile by tile instead.

    Attributes:
        in_features, out_features, blocksize, nested: the geometry and format.
        compute_dtype: the dtype the layer computes in (that of the weight it was made from).
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.blocksize = weight.blocksize
        self.compute_dtype = weight.dtype
        self.weight = nn.Parameter(weight.packed, requires_grad=False)
        self.register_buffer("weight_absmax", weight.absmax)
        self.nested = weight.nested
        for name in _NESTED:
            if self.nested:
                self.register_buffer(f"weight_{name}", getattr(weight, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Module, blocksize: int = 64, nested: bool = False) -> NF4Linear:
        """Quantise an ``nn.Linear`` (weight ``[out, in]``) or transformers ``Conv1D`` (weight
        ``[in, out]``) to NF4 (byte-identical to bitsandbytes' ``quantize_4bit``)."""
        if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
            raise ValueError(f"deltakern.nn.NF4Linear: expected an nn.Linear or Conv1D to quantise, got {type(linear).__name__}")
        dense = linear.weight.t() if is_conv1d(linear) else linear.weight
        return cls(quantize_nf4(dense.detach(), blocksize, nested), linear.bias)

    def nf4_weight(self) -> NF4Weight:
        """The quantised weight as an :class:`NF4Weight` (views of the buffers, no copy)."""
        nested = {name: getattr(self, f"weight_{name}") for name in _NESTED} if self.nested else {}
        return NF4Weight(self.weight, self.weight_absmax, (self.out_features, self.in_features), self.blocksize,
                         self.compute_dtype, **nested)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight in ``dtype`` (default the compute dtype)."""
        return self.nf4_weight().dequantize(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized(x.dtype), self.bias)

    def _apply(self, fn, recurse=True):
        # Only the device of the codes and the quantised buffers may change: a float cast would
        # destroy the fp32 scales. A dtype change (model.to(bfloat16), .half()) becomes the
        # compute dtype.
        probe = fn(torch.empty((), dtype=self.compute_dtype, device=self.weight.device))
        self.weight.data = self.weight.data.to(probe.device)
        for name, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[name] = buffer.to(probe.device)
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, nested={self.nested}, compute_dtype={self.compute_dtype}")
